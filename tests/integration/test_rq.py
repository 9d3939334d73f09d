"""RQ: bulk enqueueing, job options, errors and progress, on real RQ worker processes."""

from __future__ import annotations

import dspy
import pytest

from dmipro import tracing
from dmipro.errors import TaskError
from dmipro.jobs import JobStore, load_job
from dmipro.jobs.submit import JobHandle, submit, wait
from tests.contract.workers import Stack
from tests.integration.conftest import small_job

pytestmark = pytest.mark.integration

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CARRIER = {"traceparent": f"00-{TRACE_ID}-b7ad6b7169203331-01"}


def test_a_batch_is_one_enqueue_many_with_lm_sized_job_options(rq_stack: Stack,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from rq import Queue
    from rq.job import Job
    from rq.serializers import JSONSerializer

    from dmipro.executor_adapters.rq import RESULT_TTL_S, TASK_FUNC, WORK_TIMEOUT_S, RQAdapter

    batches: list[list[str]] = []
    original = Queue.enqueue_many

    def spy(self: Queue, job_datas: list, *args: object, **kwargs: object) -> list[Job]:
        jobs = original(self, job_datas, *args, **kwargs)
        batches.append([j.id for j in jobs])
        return jobs

    monkeypatch.setattr(Queue, "enqueue_many", spy)
    with RQAdapter(4) as ex, tracing.attach(CARRIER):
        results = dict(ex.map("tests.echo", [{"n": i} for i in range(12)]))
    assert [results[i]["echo"]["n"] for i in range(12)] == list(range(12))
    assert sum(len(b) for b in batches) == 12 and len(batches) <= 3  # shipped in bulk, not one by one
    job = Job.fetch(batches[0][0], connection=ex.connection, serializer=JSONSerializer)
    assert job.func_name == TASK_FUNC and job.origin == "dmipro.work"
    assert job.timeout == WORK_TIMEOUT_S and job.result_ttl == RESULT_TTL_S
    assert job.args[0] == "tests.echo"
    assert TRACE_ID in job.meta["trace"]["traceparent"]
    assert job.description == "dmipro.tests.echo"


def test_the_trace_context_reaches_the_worker(rq_stack: Stack) -> None:
    from dmipro.executor_adapters.rq import RQAdapter

    with RQAdapter(2) as ex, tracing.attach(CARRIER):
        where = ex.submit("contract.where", {}).result(timeout=30)
    assert TRACE_ID in where["trace"]["traceparent"]


def test_a_failure_carries_the_exception_text(rq_stack: Stack) -> None:
    from dmipro.executor_adapters.rq import RQAdapter

    with RQAdapter(2) as ex, pytest.raises(TaskError) as info:
        ex.submit("tests.fail", {"n": 7}).result(timeout=30)
    assert str(info.value) == "task tests.fail failed: ValueError: task failed on 7"
    assert info.value.error_type == "ValueError"


def test_submit_runs_the_coordinator_on_an_rq_worker(rq_stack: Stack) -> None:
    from rq.job import Job
    from rq.serializers import JSONSerializer

    from dmipro.executor_adapters.rq import COORDINATOR_TIMEOUT_S, coordinator_job_id, redis_connection

    handle = submit(small_job(), executor="rq")
    report = handle.wait(timeout=120)
    assert report["state"] == "succeeded", (report, rq_stack.logs())
    assert report["executor"] == "rq" and report["trials_done"] == 4
    program = handle.result()
    assert isinstance(program, dspy.Module)
    rq_job = Job.fetch(coordinator_job_id(handle.job_id), connection=redis_connection(),
                       serializer=JSONSerializer)
    assert rq_job.origin == "dmipro.coordinator" and rq_job.timeout == COORDINATOR_TIMEOUT_S
    assert rq_job.meta["progress"]["phase"] == "search"
    assert rq_job.meta["progress"]["trials_done"] == 4
    assert rq_job.return_value()["best_score"] == report["best_score"]


def test_a_coordinator_failing_on_the_worker_fails_the_job(rq_stack: Stack) -> None:
    from dmipro.executor_adapters.rq import RQAdapter

    spec = load_job(small_job()).to_json()
    spec["program"] = "tests.fixtures.broken:build"  # written past validation: the module raises on import
    record = JobStore().create(name="broken", spec=spec, executor="rq")
    RQAdapter.enqueue_coordinator(record.id)
    report = wait(record.id, timeout=60)
    assert report["state"] == "failed"
    assert "this module cannot be imported" in report["error"]
    assert JobHandle(record.id).status()["attempts"] == 0
