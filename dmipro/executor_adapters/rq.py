"""Tasks on RQ workers, through the ``dmipro.work`` queue.

Shipping batches everything submitted since the last cycle into one
``Queue.enqueue_many`` call (one Redis pipeline); collecting fetches every job in flight
with ``Job.fetch_many`` and reads the results of the finished ones. Jobs use RQ's JSON
serializer, carry the sender's W3C trace context in their meta, and have timeouts sized
for LM work (:data:`~dmipro.workers.rq_worker.WORK_TIMEOUT_S`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dmipro.defaults import WORK_QUEUE
from dmipro.errors import DecodeError, DmiproError, TaskError
from dmipro.executor_adapters._remote import Outcome, RemoteExecutor, Shipment, remote_error

if TYPE_CHECKING:
    from redis import Redis

__all__ = ["RQExecutor"]


class RQExecutor(RemoteExecutor):
    """Runs tasks on RQ workers consuming ``queue``.

    ``concurrency`` is the number of worker slots the job may fill (it sizes trial
    batches); the queue holds whatever does not fit.
    """

    name = "rq"

    def __init__(self, concurrency: int = 16, *, connection: Redis | None = None, queue: str = WORK_QUEUE,
                 job_timeout: int | None = None, result_ttl: int | None = None,
                 poll_interval: float = 0.05) -> None:
        from rq import Queue
        from rq.serializers import JSONSerializer

        from dmipro.workers.rq_worker import RESULT_TTL_S, WORK_TIMEOUT_S, redis_connection

        super().__init__(concurrency, poll_interval=poll_interval)
        self.connection = connection or redis_connection()
        self.queue = Queue(queue, connection=self.connection, serializer=JSONSerializer)
        self.job_timeout = job_timeout or WORK_TIMEOUT_S
        self.result_ttl = result_ttl or RESULT_TTL_S

    def _send(self, shipments: list[Shipment]) -> None:
        from rq import Queue

        from dmipro.workers.rq_worker import FAILURE_TTL_S, TASK_FUNC

        self.queue.enqueue_many([
            Queue.prepare_data(
                TASK_FUNC, args=(s.task, s.body), timeout=self._timeout(s.task), result_ttl=self.result_ttl,
                failure_ttl=FAILURE_TTL_S, job_id=s.id, meta={"trace": s.trace, "task": s.task},
                description=f"dmipro.{s.task}",
            )
            for s in shipments
        ])

    def _timeout(self, task: str) -> int:
        """RQ's job timeout: the task's deadline (plus a margin) when the job has one."""
        limit = self.deadline_for(task)
        return int(limit) + 30 if limit else self.job_timeout

    def _fetch(self, ids: list[str]) -> dict[str, Outcome]:
        from rq.job import Job, JobStatus
        from rq.serializers import JSONSerializer

        out: dict[str, Outcome] = {}
        jobs = Job.fetch_many(ids, connection=self.connection, serializer=JSONSerializer)
        for tid, job in zip(ids, jobs, strict=True):
            task = self._task_name(tid)
            if job is None:
                gone = f"task {task}: its RQ job {tid} is gone from Redis (expired or deleted)"
                out[tid] = Outcome(error=TaskError(gone, task=task, error_type="NoSuchJobError"))
                continue
            status = job.get_status(refresh=False)
            if status == JobStatus.STARTED:
                self._mark_started(tid)
            if status == JobStatus.FINISHED:
                result = job.return_value()
                if not isinstance(result, dict):
                    out[tid] = Outcome(error=DecodeError(f"task {task} returned {type(result).__name__}, "
                                                         "not a JSON object"))
                else:
                    out[tid] = Outcome(result=result)
            elif status == JobStatus.FAILED:
                out[tid] = Outcome(error=_failure(task, job))
            elif status in (JobStatus.STOPPED, JobStatus.CANCELED):
                out[tid] = Outcome(error=TaskError(f"task {task} was {status.value} before it finished",
                                                   task=task, error_type=f"Job{status.value.title()}"))
        return out

    def _task_name(self, tid: str) -> str:
        with self._lock:
            entry = self._pending.get(tid)
        return entry[0].task if entry else "?"

    def _revoke(self, ids: list[str], *, terminate: bool = False) -> None:
        from rq.command import send_stop_job_command
        from rq.exceptions import InvalidJobOperation, NoSuchJobError
        from rq.job import Job, JobStatus
        from rq.serializers import JSONSerializer

        for job in Job.fetch_many(ids, connection=self.connection, serializer=JSONSerializer):
            if job is None:
                continue
            status = job.get_status(refresh=False)
            try:
                if status == JobStatus.QUEUED:
                    job.cancel()
                elif terminate and status == JobStatus.STARTED:
                    send_stop_job_command(self.connection, job.id, serializer=JSONSerializer)
            except (InvalidJobOperation, NoSuchJobError):
                pass


def _failure(task: str, job: Any) -> DmiproError:
    error = (job.meta or {}).get("error")
    if isinstance(error, dict) and "type" in error:
        return remote_error(task, str(error["type"]), str(error.get("message", "")))
    # No recorded error: the worker died (AbandonedJobError) or a timeout stopped the job.
    result = job.latest_result()
    text = (getattr(result, "exc_string", None) or "").strip()
    last = text.splitlines()[-1] if text else "the job failed without an error message"
    type_name, _, message = last.partition(": ")
    type_name = type_name.rsplit(".", 1)[-1] if message and " " not in type_name else "Exception"
    return remote_error(task, type_name, message or last)
