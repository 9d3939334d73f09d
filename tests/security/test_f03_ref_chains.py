"""Finding 3: attribute chains must not escape the allowlist, and the teacher ref is checked too."""

from __future__ import annotations

import pytest

from dmipro.errors import RefError
from dmipro.jobs import JobStore, load_job
from dmipro.jobs.store import JobState
from dmipro.jobs.submit import JobHandle, submit
from tests.contract.workers import Stack, wait_for
from tests.integration.conftest import small_job

pytestmark = pytest.mark.integration

ABORT = "examples.math_qa.program:dspy.clients.lm.os.abort"


def test_f03_a_ref_chain_to_os_abort_is_refused_at_submit_and_on_a_celery_worker(celery_stack: Stack) -> None:
    from dmipro.executor_adapters.celery import CeleryAdapter

    hostile = small_job()
    hostile["optimizer"] = {**hostile["optimizer"], "teacher": ABORT}
    store = JobStore()
    with pytest.raises(RefError, match=r"optimizer\.teacher: .*leaves the allowed modules at .*dspy"):
        submit(hostile, executor="celery")
    assert [r for r in store.list() if r.name == hostile["name"] and r.spec.get("optimizer", {}).get(
        "teacher") == ABORT] == []
    for field in ("program", "metric"):
        with pytest.raises(RefError, match="leaves the allowed modules"):
            load_job({**small_job(), field: ABORT})
    with pytest.raises(RefError, match="private attribute '__globals__'"):
        load_job({**small_job(), "metric": "examples.math_qa.program:exact_match.__globals__"})

    # A job row that never went through validation (written straight into the job database):
    # the worker that takes its bootstrap tasks refuses the teacher and lives on.
    spec = load_job(small_job()).to_json()
    spec["optimizer"]["teacher"] = ABORT
    record = store.create(name="hostile-teacher", spec=spec, executor="celery")
    CeleryAdapter.enqueue_coordinator(record.id)
    report = JobHandle(record.id).wait(timeout=120)
    worker = celery_stack.workers["celery"][0]
    assert worker.alive, worker.log_tail()
    assert report["state"] == JobState.FAILED.value
    assert "leaves the allowed modules" in (report["error"] or "") and "optimizer.teacher" in report["error"]
    # ... and it keeps serving jobs.
    good = submit(small_job(), executor="celery")
    wait_for(lambda: good.status()["state"] in ("succeeded", "failed"), 120,
             "a valid job after the hostile one")
    assert good.status()["state"] == "succeeded", celery_stack.logs()
