"""SIGTERM a Celery work worker mid-job, as Kubernetes does when it scales a pod down.

Celery's warm shutdown stops taking messages, finishes the tasks it runs and hands back
the ones it had reserved; with ``acks_late`` nothing is acknowledged before it is done.
So a pod stopped within ``terminationGracePeriodSeconds`` loses nothing: the job ends
with exactly the result of an undisturbed run, and no task counts twice.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import redis

from dmipro.jobs.submit import submit
from tests.contract.workers import celery_worker, wait_for
from tests.integration.conftest import CrashStack, scored
from tests.integration.test_crash import assert_same_as_undisturbed, crash_job, finish

pytestmark = pytest.mark.integration

GRACE_S = 60
"""Shorter than the 120 s terminationGracePeriodSeconds of deploy/k8s/work.yaml."""


def test_a_work_worker_stopped_with_sigterm_finishes_its_tasks_and_loses_nothing(
    crash_stack: CrashStack,
) -> None:
    handle = submit(crash_job(100.0), executor="celery")
    wait_for(lambda: scored(handle.job_id, 10), 120, "trials to be running", interval=0.02)
    worker = crash_stack.roles.pop("work")
    assert worker.proc is not None
    worker.proc.terminate()  # SIGTERM: what the kubelet sends first
    try:
        code = worker.proc.wait(GRACE_S)
    except subprocess.TimeoutExpired:
        worker.kill()
        pytest.fail(f"the worker did not stop within {GRACE_S} s of SIGTERM\n{crash_stack.logs_text()}")
    crash_stack.retired.append(worker)
    assert code == 0, crash_stack.logs_text()
    assert "Warm shutdown" in worker.log_tail(200)
    crash_stack.start("work")  # the replacement pod
    report = finish(handle, crash_stack)
    assert report["attempts"] == 1

    assert_same_as_undisturbed(handle.job_id)


def test_a_task_stuck_past_the_grace_is_given_back_and_the_worker_exits(
    crash_stack: CrashStack, tmp_path: Path
) -> None:
    import tests.fixtures.tasks  # noqa: F401  (the stuck task's body, so the adapter can ship it)
    from dmipro.executor_adapters.celery import CeleryAdapter

    # A visibility timeout of an hour: the task can only come back because the worker gives it back.
    env = {**crash_stack.env, "DMIPRO_VISIBILITY_TIMEOUT": "3600", "DMIPRO_SHUTDOWN_GRACE": "2"}
    queue = "dmipro.test-stuck"
    first = celery_worker(env, tmp_path, queues=queue, concurrency=2, tag="stuck").start()
    first.wait_ready()
    marker = tmp_path / "marker"
    with CeleryAdapter(2, queue=queue) as adapter:
        future = adapter.submit("tests.stuck_once", {"marker": str(marker)})
        wait_for(marker.exists, 60, "the task to start")
        assert first.proc is not None
        first.proc.terminate()  # SIGTERM, as the kubelet sends it
        t0 = time.monotonic()
        try:
            first.proc.wait(30)
        except subprocess.TimeoutExpired:
            first.kill()
            pytest.fail(f"the worker still ran 30 s after SIGTERM with a 2 s grace\n{first.log_tail(50)}")
        assert time.monotonic() - t0 < 20
        assert "giving them back to the broker" in first.log_tail(100)
        # Back in its queue before any other worker runs: not left unacknowledged until the timeout.
        broker = redis.Redis.from_url(env["DMIPRO_BROKER_URL"])
        assert (broker.llen(queue), broker.hlen("unacked")) == (1, 0)
        second = celery_worker(env, tmp_path, queues=queue, concurrency=2, tag="stuck-next").start()
        try:
            second.wait_ready()
            assert future.result(timeout=60) == {"delivery": "again"}  # run again elsewhere, at once
        finally:
            second.stop()
