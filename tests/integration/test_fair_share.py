"""Fair share between jobs on real Celery workers: a small job is not starved by a heavy one."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

from dmipro.executor_adapters._fair import ACTIVE_KEY
from dmipro.jobs import JobStore
from dmipro.jobs.submit import submit
from tests.contract.workers import Stack, wait_for
from tests.integration.conftest import small_job


def _job(name: str, *, trials: int, val: int, chunk: int) -> dict[str, Any]:
    spec = small_job(latency_ms=40, val=val, num_trials=trials, minibatch_size=min(10, val))
    spec["name"] = name
    spec["executor"] = {"backend": "celery", "concurrency": 8, "chunk_size": chunk}
    return spec


@pytest.mark.integration
def test_a_small_job_behind_a_heavy_one_runs_its_trials_before_the_heavy_one_finishes(
    celery_stack: Stack,
) -> None:
    broker = redis.Redis.from_url(celery_stack.envs["celery"]["DMIPRO_BROKER_URL"])
    # Heavy: 40 validation examples, one example per task, many trials: hundreds of tasks.
    heavy = submit(_job("heavy", trials=16, val=40, chunk=1), executor="celery")
    wait_for(lambda: heavy.status()["phase"] == "search", 180, "the heavy job's search")
    small = submit(_job("small", trials=2, val=10, chunk=5), executor="celery")

    both_shared = False
    small_trial_at = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if broker.zcard(ACTIVE_KEY) >= 2:
            both_shared = True  # the two coordinators' executors see each other
        s = small.status()
        if small_trial_at is None and (s["trials_done"] or 0) >= 1:
            small_trial_at = time.time()
        if s["state"] in {"succeeded", "failed", "cancelled"} and heavy.status()["state"] != "running":
            break
        time.sleep(0.05)

    small_report = small.wait(timeout=60)
    heavy_report = heavy.wait(timeout=300)
    assert small_report["state"] == heavy_report["state"] == "succeeded", celery_stack.logs()
    assert small_trial_at is not None, "the small job never reported a finished trial"
    heavy_finished = JobStore().get(heavy.job_id).finished_at
    assert heavy_finished is not None
    assert small_trial_at < heavy_finished, "the small job's first trial waited for the heavy job to finish"
    assert small_report["finished_at"] < heavy_finished
    assert both_shared, "the two jobs never registered in the fleet's fair share"
    assert broker.zcard(ACTIVE_KEY) == 0  # both gave their share back when they finished
