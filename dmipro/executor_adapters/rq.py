"""Tasks on RQ workers, through the ``dmipro.work`` queue.

Shipping batches everything submitted since the last cycle into one
``Queue.enqueue_many`` call (one Redis pipeline); collecting fetches every job in flight
with ``Job.fetch_many`` and reads the results of the finished ones. Jobs use RQ's JSON
serializer, carry the sender's W3C trace context in their meta, and have timeouts sized
for LM work (:data:`~dmipro.workers.rq_worker.WORK_TIMEOUT_S`).

RQ marks the job of a worker that died (SIGKILL, a lost machine) as abandoned only when
the job's timeout has passed, an hour for LM work. dmipro's RQ workers keep their worker
key alive with a short TTL (:data:`WORKER_ALIVE_TTL_S`), so a ``started`` job whose worker
key is gone belongs to a dead worker: the collector sends it again under the same id, as
it does a job that vanished from Redis (a restart without persistence). Bodies are
idempotent and each id is consumed once, so a second run is harmless; after
:data:`MAX_RESENDS` the task fails with the reason instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from dmipro.defaults import WORK_QUEUE
from dmipro.errors import DecodeError, DmiproError, TaskError
from dmipro.executor_adapters._remote import Outcome, RemoteExecutor, Shipment, remote_error

if TYPE_CHECKING:
    from redis import Redis

__all__ = ["MAX_RESENDS", "WORKER_ALIVE_TTL_S", "RQExecutor", "dead_workers", "worker_key"]

log = logging.getLogger(__name__)

WORKER_ALIVE_TTL_S = 15
"""Seconds a dmipro RQ worker's key outlives its last heartbeat (it beats every third of that)."""

MAX_RESENDS = 3
"""How often one task is sent again (dead worker, vanished job) before it fails."""


def worker_key(name: str) -> str:
    """RQ's Redis key of worker ``name`` (it exists while the worker lives)."""
    from rq.worker import Worker

    return str(Worker.redis_worker_namespace_prefix) + name


def dead_workers(connection: Redis, names: Iterable[str]) -> set[str]:
    """The workers among ``names`` whose key has expired: they died, and their jobs with them."""
    unique = sorted({n for n in names if n})
    if not unique:
        return set()
    with connection.pipeline(transaction=False) as pipe:
        for name in unique:
            pipe.exists(worker_key(name))
        alive = pipe.execute()
    return {name for name, exists in zip(unique, alive, strict=True) if not exists}


class RQExecutor(RemoteExecutor):
    """Runs tasks on RQ workers consuming ``queue``.

    ``concurrency`` is the number of worker slots the job may fill (it sizes trial
    batches); the queue holds whatever does not fit.
    """

    name = "rq"

    def __init__(self, concurrency: int = 16, *, connection: Redis | None = None, queue: str = WORK_QUEUE,
                 job_timeout: int | None = None, result_ttl: int | None = None,
                 poll_interval: float = 0.05, priority: float = 1.0) -> None:
        from rq import Queue
        from rq.serializers import JSONSerializer

        from dmipro.workers.rq_worker import RESULT_TTL_S, WORK_TIMEOUT_S, redis_connection

        super().__init__(concurrency, poll_interval=poll_interval, priority=priority)
        self.connection = connection or redis_connection()
        self.queue = Queue(queue, connection=self.connection, serializer=JSONSerializer)
        self.job_timeout = job_timeout or WORK_TIMEOUT_S
        self.result_ttl = result_ttl or RESULT_TTL_S
        self.lost_check_s = WORKER_ALIVE_TTL_S / 3
        """Seconds between two looks for tasks of dead workers."""
        self._next_lost_check = 0.0
        self._resends: dict[str, int] = {}

    def _fair_client(self) -> Any:
        return self.connection

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
        lost: dict[str, str] = {}
        started: dict[str, str] = {}
        for tid, job in zip(ids, jobs, strict=True):
            task = self._task_name(tid)
            if job is None:
                lost[tid] = "vanished from Redis"
                continue
            status = job.get_status(refresh=False)
            if status == JobStatus.STARTED:
                self._mark_started(tid)
                if job.worker_name:
                    started[tid] = job.worker_name
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
        now = time.monotonic()
        if started and now >= self._next_lost_check:
            self._next_lost_check = now + self.lost_check_s
            dead = dead_workers(self.connection, started.values())
            lost.update({tid: f"its worker {name} died" for tid, name in started.items() if name in dead})
        if lost:
            out.update(self._resend(lost))
        for tid in out:
            self._resends.pop(tid, None)
        return out

    def _resend(self, lost: dict[str, str]) -> dict[str, Outcome]:
        """Send the ``lost`` tasks again (same ids); those sent too often fail instead."""
        failed: dict[str, Outcome] = {}
        again: list[Shipment] = []
        for tid, why in lost.items():
            with self._lock:
                entry = self._pending.get(tid)
            if entry is None:
                continue
            n = self._resends[tid] = self._resends.get(tid, 0) + 1
            if n > MAX_RESENDS:
                task = entry[0].task
                failed[tid] = Outcome(error=TaskError(
                    f"task {task}: its RQ job {tid} {why}, after being sent {n} times; giving up",
                    task=task, error_type="LostTaskError"))
                self._resends.pop(tid, None)
                continue
            log.warning("RQ task %s (%s) %s; sending it again (%d/%d)", tid, entry[0].task, why, n,
                        MAX_RESENDS)
            again.append(entry[0])
        if again:
            self._send(again)
        return failed

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
    meta = job.meta if isinstance(job.meta, dict) else {}  # a job written by something else
    error = meta.get("error")
    if isinstance(error, dict) and "type" in error:
        return remote_error(task, str(error["type"]), str(error.get("message", "")))
    # No recorded error: the worker died (AbandonedJobError) or a timeout stopped the job.
    result = job.latest_result()
    text = (getattr(result, "exc_string", None) or "").strip()
    last = text.splitlines()[-1] if text else "the job failed without an error message"
    type_name, _, message = last.partition(": ")
    type_name = type_name.rsplit(".", 1)[-1] if message and " " not in type_name else "Exception"
    return remote_error(task, type_name, message or last)
