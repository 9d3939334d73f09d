"""One rate limit for the fleet: local and Redis-shared limiters, the cool-down, AIMD, the breaker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmipro.errors import LMAuthError
from dmipro.jobs.spec import RateLimitConfig
from dmipro.lm.ratelimit import (
    LocalBackend,
    RateLimiter,
    RedisBackend,
    limiter_key,
    refusal,
    refuse_key,
    reset,
)
from dmipro.lm.server import SimHTTPServer, serve_in_thread

REPO = Path(__file__).resolve().parents[2]


def test_the_key_names_provider_model_and_key_variable_never_the_key() -> None:
    assert limiter_key("openai/gpt-4o-mini", "OPENAI_API_KEY") == "openai:gpt-4o-mini:OPENAI_API_KEY"
    assert limiter_key("sim/math", None) == "sim:math:-"
    key = limiter_key("openai/sim-math", "K", "http://127.0.0.1:8900/v1")
    assert key == "openai:sim-math:K@127.0.0.1:8900"


def test_a_refused_key_gives_a_fresh_copy_of_its_error_until_the_time_runs_out() -> None:
    error = LMAuthError("the provider rejected the API key in $K (401)", status=401)
    refuse_key("t:refused:K", error, 0.2)
    first, second = refusal("t:refused:K"), refusal("t:refused:K")
    assert isinstance(first, LMAuthError) and first is not error and first is not second
    assert str(first) == str(error) and first.status == 401
    assert refusal("t:other:K") is None  # per key
    time.sleep(0.25)
    assert refusal("t:refused:K") is None
    refuse_key("t:refused:K", error, 60.0)
    reset()  # a worker starting afresh asks the provider again
    assert refusal("t:refused:K") is None


def test_local_limiter_keeps_threads_under_the_rpm_together() -> None:
    limiter = RateLimiter("t:rpm", LocalBackend(), rpm=600)  # 10/s, one second of burst
    stamps: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + 2.0

    def worker() -> None:
        while time.monotonic() < stop:
            limiter.acquire()
            with lock:
                stamps.append(time.monotonic())
            limiter.release(ok=True)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # burst of 10, then (600 - 10) / 60 per second (calls let through after the stop do not count)
    window = [s for s in stamps if s <= stop]
    assert 2.0 * 590 / 60 <= len(window) <= 10 + 2.0 * 590 / 60 + 1


def test_a_429_pauses_the_key_and_halves_concurrency() -> None:
    limiter = RateLimiter("t:cool", LocalBackend())
    before = limiter.concurrency_cap
    limiter.acquire()
    limiter.release(ok=False, rate_limited=True, retry_after=0.5, transient=True)
    assert limiter.concurrency_cap <= max(1, before // 2)
    assert "rate-limited" in (limiter.describe() or "")
    waited = limiter.acquire()
    limiter.release(ok=True)
    assert 0.4 <= waited < 1.0


def test_the_breaker_opens_after_failures_in_a_row_and_a_probe_closes_it() -> None:
    limiter = RateLimiter("t:breaker", LocalBackend(), breaker_failures=3, breaker_open_s=0.3)
    opened = []
    for _ in range(3):
        limiter.acquire()
        opened.append(limiter.release(ok=False, transient=True))
    assert opened == [False, False, True]
    assert "circuit open" in (limiter.describe() or "")
    waited = limiter.acquire()  # the probe waits for the open period
    assert waited >= 0.25
    limiter.release(ok=True)
    assert limiter.describe() is None
    # 429s are the limiter's business, not the breaker's
    for _ in range(5):
        limiter.acquire()
        limiter.release(ok=False, rate_limited=True, transient=True, retry_after=0.0)
    assert "circuit" not in (limiter.describe() or "")


def test_the_cool_down_is_shared_through_redis(redis_url: str) -> None:
    # two backends, two connections: as two worker processes see the same Redis
    first = RateLimiter("t:shared", RedisBackend(redis_url))
    second = RateLimiter("t:shared", RedisBackend(redis_url))
    first.acquire()
    first.release(ok=False, rate_limited=True, retry_after=0.6, transient=True)
    assert 0.3 < second.backend.cooling("t:shared") <= 0.6
    waited = second.acquire()
    second.release(ok=True)
    assert 0.3 <= waited < 1.2


# --- two worker processes, one Redis, one provider that enforces its limit ------------------

_WORKER = textwrap.dedent(
    """
    import json, sys, threading, time
    from dmipro.jobs.spec import LMConfig
    from dmipro.lm import build_lm
    from dmipro.lm.usage import metered
    url, redis_url, seconds, name = sys.argv[1], sys.argv[2] or None, float(sys.argv[3]), sys.argv[4]
    config = LMConfig(model="openai/sim-math", api_base=url, api_key_env="SIM_KEY", cache=False,
                      rate_limit={"rpm": 600}, retry={"deadline_s": 30})
    lm = build_lm(config, shared_url=redis_url)
    stop = time.monotonic() + seconds
    done = []
    def work(i):
        n = 0
        while time.monotonic() < stop:
            with metered() as meter:
                lm(f"{name} thread {i} call {n}: what is 2 + {n}?")
            done.append(meter.faults.to_json())
            n += 1
    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    print(json.dumps({"calls": len(done), "rate_limited": sum(d["rate_limited"] for d in done)}))
    """
)


@pytest.fixture
def limited_server() -> Iterator[SimHTTPServer]:
    server = serve_in_thread(rpm=600)  # the provider allows 10 requests/s in all
    yield server
    server.shutdown()
    server.server_close()


def _two_workers(url: str, redis_url: str, seconds: float) -> list[dict[str, int]]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "SIM_KEY": "sk-test",
           "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    procs = [
        subprocess.Popen([sys.executable, "-c", _WORKER, url, redis_url, str(seconds), f"w{i}"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


@pytest.mark.slow
def test_two_worker_processes_stay_under_the_limit_together(
    redis_url: str, limited_server: SimHTTPServer
) -> None:
    workers = _two_workers(limited_server.url, redis_url, 6.0)
    stats = dict(limited_server.stats)
    assert all(w["calls"] > 0 for w in workers)
    # sharing one bucket, the two processes together stay under the provider's 10/s
    assert stats.get("429", 0) <= 0.03 * stats["total"], stats
    assert sum(w["rate_limited"] for w in workers) == stats.get("429", 0)


@pytest.mark.slow
def test_without_a_shared_limiter_the_same_two_processes_get_429s(limited_server: SimHTTPServer) -> None:
    # the contrast: each process alone keeps its own 10/s, so together they ask for 20/s
    _two_workers(limited_server.url, "", 6.0)
    stats = dict(limited_server.stats)
    assert stats.get("429", 0) > 0.1 * stats["total"], stats


def test_a_declared_limit_reaches_the_limiter() -> None:
    from dmipro.jobs.spec import LMConfig
    from dmipro.lm import build_lm

    lm = build_lm(LMConfig(model="sim/math", rate_limit=RateLimitConfig(rpm=120, tpm=10_000)))
    guard = lm._dmipro_guard
    assert (guard.limiter.rpm, guard.limiter.tpm) == (120, 10_000)
    assert guard.limiter.key == "sim:math:-"


def test_an_undeclared_limit_is_discovered_from_the_providers_headers(
    limited_server: SimHTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dmipro.jobs.spec import LMConfig
    from dmipro.lm import build_lm
    from dmipro.lm.usage import metered

    monkeypatch.setenv("SIM_KEY", "sk-test")
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    lm = build_lm(LMConfig(model="openai/sim-math", api_base=limited_server.url, api_key_env="SIM_KEY",
                           cache=False))

    def work(i: int) -> None:
        for n in range(10):
            with metered():
                lm(f"thread {i} call {n}: what is 3 + {n}?")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    limiter = lm._dmipro_guard.limiter
    assert (limiter.rpm, limiter.discovered) == (600, True)
    stats = dict(limited_server.stats)
    assert stats["200"] == 80
    # after the first 429s told it the limit, the process keeps under it
    assert stats.get("429", 0) < 0.4 * stats["total"], stats


def test_an_unreachable_redis_limits_in_process_instead_of_failing_the_call() -> None:
    from tests.conftest import free_port

    backend = RedisBackend(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    limiter = RateLimiter("openai:m:KEY", backend, rpm=60)
    assert limiter.acquire() == 0.0  # the one-second burst: the first call goes at once
    limiter.release(ok=True)
    backend.cool_down("openai:m:KEY", 5.0)
    assert 4.0 < backend.cooling("openai:m:KEY") <= 5.0  # the pause holds in this process
