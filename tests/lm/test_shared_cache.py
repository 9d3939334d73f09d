"""The shared LM response cache on a real Redis, from separate processes.

Each child process builds a job's LM with ``cache: shared`` the way a worker does, waits
for a start signal in Redis, then asks the simulator; the parent counts the calls that
reached the model in every process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from dmipro.lm._shared_cache import PREFIX, shared_cache_stats

REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, sys, time
import dspy, redis
from dmipro.jobs.spec import LMConfig
from dmipro.lm import build_lm
from dmipro.lm._shared_cache import share_cache
from dmipro.lm._sim import SimEngine

url, job, question, fail, go = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1", sys.argv[5]
calls = 0
original = SimEngine.complete
def counting(self, request):
    global calls
    calls += 1
    if fail:
        raise RuntimeError("the provider is down")
    return original(self, request)
SimEngine.complete = counting

keys = []
# No disk cache: an earlier run's answers on this machine must not stand in for the shared cache.
dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=True)
lm = build_lm(LMConfig(model="sim/math", temperature=0.0, cache="shared", sim={"latency_ms": 500}))
share_cache(lm, job, url)
local = dspy.cache.local
put = local.put
def spy(request, value, ignored=None, enable_memory_cache=True):
    keys.append(local.cache_key(request, ignored))  # the key DSPy's own cache uses
    return put(request, value, ignored, enable_memory_cache)
local.put = spy
client = redis.Redis.from_url(url)
client.incr("children-ready")
while not client.exists(go):
    time.sleep(0.005)
answer, error = None, None
try:
    with dspy.context(lm=lm):
        answer = dspy.Predict("question -> answer")(question=question).answer
except Exception as exc:
    error = type(exc).__name__
print(json.dumps({"calls": calls, "answer": answer, "keys": keys, "error": error}))
"""


def run_children(url: str, job: str, questions: list[str], *, fail: list[bool] | None = None,
                 stagger_s: float = 0.0) -> list[dict[str, Any]]:
    """Run one child per question; with ``stagger_s`` each starts that long after the one before."""
    client = redis.Redis.from_url(url)
    client.delete("children-ready", *[f"go{i}" for i in range(len(questions))])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    fail = fail or [False] * len(questions)
    procs = [
        subprocess.Popen([sys.executable, "-c", CHILD, url, job, q, "1" if f else "0", f"go{i}"], env=env,
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i, (q, f) in enumerate(zip(questions, fail, strict=True))
    ]
    deadline = time.monotonic() + 120
    while int(client.get("children-ready") or 0) < len(procs):
        assert time.monotonic() < deadline, "the child processes did not start"
        time.sleep(0.05)
    for i in range(len(procs)):
        client.set(f"go{i}", "1")
        time.sleep(stagger_s)
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


@pytest.fixture
def url(redis_server: str) -> str:
    url = f"{redis_server}/7"
    redis.Redis.from_url(url).flushdb()
    return url


QUESTION = "Tom has 3 boxes of 12 apples and eats 5. How many apples are left?"


def test_two_workers_asking_the_same_prompt_make_one_call(url: str) -> None:
    first, second = run_children(url, "job-a", [QUESTION, QUESTION])
    assert first["calls"] + second["calls"] == 1  # in-flight deduplication across processes
    assert first["answer"] == second["answer"] is not None
    stats = shared_cache_stats("job-a", url)
    assert stats["misses"] == 1 and stats["hits"] + stats["deduplicated"] == 1
    assert stats["hit_rate"] == 0.5
    # The response sits under DSPy's own cache key for that request.
    caller = first if first["calls"] else second
    stored = {k.decode()[len(PREFIX) + 2:] for k in redis.Redis.from_url(url).keys(f"{PREFIX}r:*")}
    assert stored == set(caller["keys"]) and len(stored) == 1


def test_a_later_worker_hits_the_cache_and_other_prompts_are_not_shared(url: str) -> None:
    run_children(url, "job-b", [QUESTION])
    again, other = run_children(url, "job-b", [QUESTION, "Ann has 7 pens and buys 6 more. How many pens?"])
    assert again["calls"] == 0 and other["calls"] == 1
    stats = shared_cache_stats("job-b", url)
    assert stats["hits"] == 1 and stats["misses"] == 2


def test_a_failed_call_releases_its_lock_so_the_waiter_calls_itself(url: str) -> None:
    # The failing process starts first and takes the lock; the healthy one waits on it.
    failing, waiting = run_children(url, "job-c", [QUESTION, QUESTION], fail=[True, False], stagger_s=0.2)
    assert failing["calls"] >= 1 and failing["error"] is not None
    assert waiting["calls"] == 1 and waiting["answer"] is not None
    assert not redis.Redis.from_url(url).keys(f"{PREFIX}l:*")  # no lock left behind


def test_a_job_reports_its_hit_rate_and_a_second_job_reuses_the_first_ones_answers(
    url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import dmipro
    from dmipro.config import reload_settings
    from tests.fixtures.jobs import math_job

    monkeypatch.setenv("DMIPRO_BROKER_URL", url)
    monkeypatch.setenv("DMIPRO_HOME", str(tmp_path))
    reload_settings()
    lm = {"model": "sim/math", "temperature": 0.0, "cache": "shared"}
    spec = math_job(20, lm=lm, optimizer={"auto": None, "num_candidates": 3, "num_trials": 3,
                                          "minibatch_size": 10, "seed": 9},
                    executor={"backend": "thread", "concurrency": 4})
    first = dmipro.optimize(spec)
    second = dmipro.optimize(spec)
    assert first.lm_cache is not None and second.lm_cache is not None
    assert first.lm_cache["misses"] > 0 and first.lm_cache["errors"] == 0
    # The second job asks the task LM the same prompts: every one is served from Redis.
    assert second.lm_cache["misses"] == 0 and second.lm_cache["hit_rate"] == 1.0
    assert second.best_score == first.best_score
    assert second.summary()["lm_cache"] == second.lm_cache
