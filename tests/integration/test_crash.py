"""SIGKILL Celery workers in the middle of a job: nothing is lost, nothing counts twice.

The crash workers run with ``DMIPRO_VISIBILITY_TIMEOUT=5``: the Redis broker hands the
messages a dead worker held to another worker five seconds after the dead worker stopped
extending them. Live workers extend theirs, so the long-running coordinator is never
redelivered while it runs. (With the prefork pool a killed *child* is requeued at once
through ``task_reject_on_worker_lost``; killing the whole worker, as here, is the case
only the visibility timeout covers.)
"""

from __future__ import annotations

from typing import Any

import optuna
import pytest

from dmipro.executor_adapters import ThreadAdapter
from dmipro.jobs import JobStore, load_job
from dmipro.jobs.submit import JobHandle, JobTimeoutError, submit
from dmipro.teleprompt.mipro import run_job
from tests.contract.workers import wait_for
from tests.integration.conftest import CrashStack, scored, small_job

pytestmark = pytest.mark.integration

TRIALS = 8


def crash_job(latency_ms: float) -> dict[str, Any]:
    return small_job(latency_ms=latency_ms, num_trials=TRIALS)


def reference() -> dict[str, Any]:
    """The same job without a crash (and without the simulated latency, which changes no answer)."""
    job = load_job(crash_job(0.0))
    record = JobStore().create(name="reference", spec=job.to_json(), executor="thread")
    with ThreadAdapter(4) as ex:
        run_job(record.id, executor=ex)
    return dict(JobStore().get(record.id).result or {})


def assert_same_as_undisturbed(job_id: str) -> None:
    """The job's result is the undisturbed run's: trials, best score and candidate, LM calls, trial log."""
    result = JobStore().get(job_id).result or {}
    expected = reference()
    assert result["trials"] == expected["trials"] == TRIALS
    assert result["best_score"] == expected["best_score"]
    assert result["best_candidate"] == expected["best_candidate"]
    # Redelivered tasks ran twice on the workers, but each task's result counted once.
    assert result["lm_calls"] == expected["lm_calls"]
    assert result["trial_logs"] == expected["trial_logs"]


def finish(handle: JobHandle, stack: CrashStack) -> dict[str, Any]:
    try:
        report = handle.wait(timeout=120)
    except JobTimeoutError as exc:
        pytest.fail(f"{exc}\n{stack.logs_text()}")
    assert report["state"] == "succeeded", (report, stack.logs_text())
    return report


def test_a_killed_work_worker_loses_no_trial(crash_stack: CrashStack) -> None:
    handle = submit(crash_job(100.0), executor="celery")
    wait_for(lambda: scored(handle.job_id, 10), 120, "trials to be running", interval=0.02)
    crash_stack.kill("work")  # its running and reserved tasks die unacknowledged
    crash_stack.start("work")
    report = finish(handle, crash_stack)
    assert report["attempts"] == 1  # the coordinator itself never stopped

    assert_same_as_undisturbed(handle.job_id)


def test_a_killed_coordinator_resumes_and_finishes_once(crash_stack: CrashStack) -> None:
    from celery.result import AsyncResult

    from dmipro.executor_adapters.celery import coordinator_task_id, get_app

    handle = submit(crash_job(100.0), executor="celery")
    wait_for(lambda: scored(handle.job_id, 10), 120, "trials to be running", interval=0.02)
    crash_stack.kill("coordinator")
    crash_stack.start("coordinator")
    report = finish(handle, crash_stack)
    assert report["attempts"] == 2  # redelivered once, resumed once

    record = JobStore().get(handle.job_id)
    result = record.result or {}
    # The finished phases came from their checkpoints; the study went on where it was.
    assert result["phases"]["bootstrap"]["resumed"] and result["phases"]["propose"]["resumed"]
    minibatch = [t for t in result["trial_logs"].values() if not t["full_eval"]]
    assert result["trials"] == len(minibatch) == TRIALS
    # No trial was told twice or left running: the study holds exactly what the log shows.
    study = optuna.load_study(study_name=f"dmipro:{handle.job_id}",
                              storage=JobStore().engine.url.render_as_string(hide_password=False))
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == len(result["trial_logs"]) and "RUNNING" not in states
    coordinator = AsyncResult(coordinator_task_id(handle.job_id), app=get_app())
    wait_for(coordinator.ready, 30, "the coordinator task to report")
    assert coordinator.state == "SUCCESS" and coordinator.result["best_score"] == report["best_score"]
