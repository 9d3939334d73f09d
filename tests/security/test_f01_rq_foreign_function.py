"""Finding 1: a job written into Redis that names a foreign function must not run on an RQ worker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.contract.workers import Stack, wait_for

pytestmark = pytest.mark.integration


def test_f01_an_rq_worker_refuses_a_foreign_function_written_into_its_queue(rq_stack: Stack,
                                                                             tmp_path: Path) -> None:
    import redis
    from rq import Callback, Queue
    from rq.job import Job, JobStatus
    from rq.serializers import JSONSerializer

    from dmipro.executor_adapters.rq import TASK_FUNC, RQAdapter, redis_connection

    # Without the password the broker answers nothing at all.
    bare = rq_stack.envs["rq"]["DMIPRO_BROKER_URL"].replace(rq_stack.redis_base.split("@")[0] + "@", "redis://")
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(bare).ping()

    # The attacker holds the password (or the broker has none): a plain RQ job, JSON-serialized
    # as dmipro's own, naming os.makedirs on a marker path, in front of the real work workers.
    marker = tmp_path / "ran-foreign-code"
    connection = redis_connection()
    queue = Queue("dmipro.work", connection=connection, serializer=JSONSerializer)
    foreign = queue.enqueue_call("os.makedirs", args=(str(marker),))
    # dmipro's own entry point, but with a callback RQ would import and call afterwards.
    hooked = queue.enqueue_call(TASK_FUNC, args=("tests.echo", json.dumps({"n": 1})),
                                on_success=Callback("os.makedirs"))

    def finished() -> bool:
        jobs = Job.fetch_many([foreign.id, hooked.id], connection=connection, serializer=JSONSerializer)
        return all(j is not None and j.get_status() in (JobStatus.FAILED, JobStatus.FINISHED) for j in jobs)

    wait_for(finished, 60, "the workers to take both injected jobs")
    for job_id in (foreign.id, hooked.id):
        job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
        assert job.get_status() == JobStatus.FAILED, rq_stack.logs()
        assert "RefusedJob" in (job.latest_result().exc_string or "")
    assert not marker.exists(), "the worker ran the function the injected job named"
    logs = rq_stack.logs()
    assert f"refused RQ job {foreign.id}" in logs and "os.makedirs" in logs
    assert f"refused RQ job {hooked.id}" in logs

    # The workers are still alive and run dmipro's own tasks.
    assert all(w.alive for w in rq_stack.workers["rq"])
    with RQAdapter(2) as ex:
        assert ex.submit("tests.echo", {"n": 2}).result(timeout=30) == {"echo": {"n": 2}}
