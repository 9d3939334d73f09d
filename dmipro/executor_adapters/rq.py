"""RQ: the wire protocol (function paths, timeouts, the coordinator job) and the adapter.

**The protocol.** Jobs use RQ's JSON serializer and name their function by dotted path:
:data:`TASK_FUNC` (``run_task(name, body)``) for work tasks on ``dmipro.work`` and
:data:`OPTIMIZE_FUNC` (``run_optimize(body)``) for a job's coordinator on
``dmipro.coordinator``, with the RQ job id :func:`coordinator_job_id`. The sender's W3C
trace context travels in the job's ``meta["trace"]``. The functions themselves live in
:mod:`dmipro.workers.rq_worker`; this module names them and never imports the worker.

**The adapter.** Shipping batches everything submitted since the last cycle into one
``Queue.enqueue_many`` call (one Redis pipeline); collecting fetches every job in flight
with ``Job.fetch_many`` and reads the results of the finished ones. Timeouts are sized
for LM work (:data:`WORK_TIMEOUT_S`).

RQ marks the job of a worker that died (SIGKILL, a lost machine) as abandoned only when
the job's timeout has passed, an hour for LM work. dmipro's RQ workers keep their worker
key alive with a short TTL (:data:`WORKER_ALIVE_TTL_S`), so a ``started`` job whose worker
key is gone belongs to a dead worker: the collector sends it again under the same id, as
it does a job that vanished from Redis (a restart without persistence). Bodies are
idempotent and each id is consumed once, so a second run is harmless; after
:data:`MAX_RESENDS` the task fails with the reason instead.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from dmipro import defaults, tracing
from dmipro._imports import guarded
from dmipro.config import get_settings
from dmipro.defaults import COORDINATOR_QUEUE, WORK_QUEUE
from dmipro.errors import DecodeError, DmiproError, TaskError
from dmipro.executor_adapters._remote import Outcome, RemoteAdapter, Shipment, remote_error

with guarded(extra="rq", purpose="the RQ executor"):
    from redis import Redis
    from rq import Queue, Worker
    from rq.command import send_stop_job_command
    from rq.exceptions import InvalidJobOperation, NoSuchJobError
    from rq.job import Job, JobStatus
    from rq.serializers import JSONSerializer

__all__ = [
    "COORDINATOR_TIMEOUT_S",
    "FAILURE_TTL_S",
    "MAX_RESENDS",
    "OPTIMIZE_FUNC",
    "RESULT_TTL_S",
    "TASK_FUNC",
    "WORKER_ALIVE_TTL_S",
    "WORK_TIMEOUT_S",
    "RQAdapter",
    "coordinator_job_id",
    "dead_workers",
    "redis_connection",
    "worker_key",
]

log = logging.getLogger(__name__)

TASK_FUNC = "dmipro.workers.rq_worker.run_task"
"""Dotted path of the work-task job function."""

OPTIMIZE_FUNC = "dmipro.workers.rq_worker.run_optimize"
"""Dotted path of the coordinator job function."""

WORK_TIMEOUT_S = defaults.RQ_WORK_TIMEOUT_S

COORDINATOR_TIMEOUT_S = defaults.RQ_COORDINATOR_TIMEOUT_S

RESULT_TTL_S = defaults.RQ_RESULT_TTL_S

FAILURE_TTL_S = defaults.RQ_FAILURE_TTL_S

WORKER_ALIVE_TTL_S = defaults.RQ_WORKER_ALIVE_TTL_S

MAX_RESENDS = 3
"""How often one task is sent again (dead worker, vanished job) before it fails."""


def redis_connection(url: str | None = None) -> Redis:
    """A Redis connection to ``url`` (default: the settings' broker URL)."""
    return Redis.from_url(url or get_settings().broker_url)


def coordinator_job_id(job_id: str) -> str:
    """The RQ job id of a job's coordinator (RQ ids allow letters, digits, ``_`` and ``-``)."""
    return "optimize-" + re.sub(r"[^A-Za-z0-9_-]", "_", job_id)


def worker_key(name: str) -> str:
    """RQ's Redis key of worker ``name`` (it exists while the worker lives)."""
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


class RQAdapter(RemoteAdapter):
    """Runs tasks on RQ workers consuming ``queue``.

    ``concurrency`` is the number of worker slots the job may fill (it sizes trial
    batches); the queue holds whatever does not fit.
    """

    name = "rq"

    def __init__(self, concurrency: int = 16, *, connection: Redis | None = None, queue: str = WORK_QUEUE,
                 job_timeout: int | None = None, result_ttl: int | None = None,
                 poll_interval: float = 0.05, priority: float = 1.0) -> None:
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


    # -- a job's coordinator message -----------------------------------------------------
    @classmethod
    def check_broker(cls) -> None:
        redis_connection().ping()

    @classmethod
    def enqueue_coordinator(cls, job_id: str, executor: str | None = None, *,
                            connection: Redis | None = None) -> str:
        connection = connection or redis_connection()
        queue = Queue(COORDINATOR_QUEUE, connection=connection, serializer=JSONSerializer)
        rq_id = coordinator_job_id(job_id)
        queue.enqueue_call(
            OPTIMIZE_FUNC, args=(json.dumps({"job_id": job_id, "executor": executor or cls.name}),),
            timeout=COORDINATOR_TIMEOUT_S, result_ttl=FAILURE_TTL_S, failure_ttl=FAILURE_TTL_S, job_id=rq_id,
            meta={"trace": tracing.inject(), "job_id": job_id},
            description=f"dmipro.optimize(job_id={job_id})",
        )
        return rq_id

    @classmethod
    def resend_coordinator(cls, job_id: str, executor: str) -> str:
        connection = redis_connection()
        rq_id = coordinator_job_id(job_id)
        old = Job.fetch_many([rq_id], connection=connection, serializer=JSONSerializer)[0]
        if old is not None:
            old.delete()  # out of the registries of the dead worker; the same id is used again
        return cls.enqueue_coordinator(job_id, executor, connection=connection)

    @classmethod
    def cancel_coordinator(cls, job_id: str) -> None:
        try:
            job = Job.fetch(coordinator_job_id(job_id), connection=redis_connection(),
                            serializer=JSONSerializer)
            if job.get_status() in (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED):
                job.cancel()
        except (NoSuchJobError, InvalidJobOperation):
            pass

    @classmethod
    def coordinator_consumers(cls, timeout: float = 1.0) -> int:
        connection = redis_connection()
        now = datetime.now(UTC)
        live = 0
        queue = Queue(COORDINATOR_QUEUE, connection=connection)
        for worker in Worker.all(connection=connection, queue=queue):
            beat = worker.last_heartbeat
            if beat is not None and beat.tzinfo is None:
                beat = beat.replace(tzinfo=UTC)
            if beat is None or (now - beat).total_seconds() <= max(worker.worker_ttl, 60):
                live += 1
        return live

    @classmethod
    def held_coordinators(cls, job_ids: list[str]) -> set[str]:
        client = redis_connection()
        queue = Queue(COORDINATOR_QUEUE, connection=client, serializer=JSONSerializer)
        rq_ids = [coordinator_job_id(j) for j in job_ids]
        jobs = Job.fetch_many(rq_ids, connection=client, serializer=JSONSerializer)
        queued = {i.decode() if isinstance(i, bytes) else str(i) for i in client.lrange(queue.key, 0, -1)}
        started = {j.id: j.worker_name for j in jobs
                   if j is not None and j.get_status(refresh=False) == JobStatus.STARTED and j.worker_name}
        dead = dead_workers(client, started.values())
        out = set()
        for job_id, rq_id, job in zip(job_ids, rq_ids, jobs, strict=True):
            if job is None:
                continue
            status = job.get_status(refresh=False)
            if (status == JobStatus.QUEUED and rq_id in queued) or status in (JobStatus.DEFERRED,
                                                                               JobStatus.SCHEDULED):
                out.add(job_id)
            elif status == JobStatus.STARTED and rq_id in started and started[rq_id] not in dead:
                out.add(job_id)
        return out


def _failure(task: str, job: Any) -> DmiproError:
    meta = job.meta if isinstance(job.meta, dict) else {}  # a job written by something else
    error = meta.get("error")
    if isinstance(error, dict) and "type" in error:  # the worker's error record
        return remote_error(task, error)
    # No recorded error: the worker died (AbandonedJobError) or a timeout stopped the job.
    result = job.latest_result()
    text = (getattr(result, "exc_string", None) or "").strip()
    last = text.splitlines()[-1] if text else "the job failed without an error message"
    type_name, _, message = last.partition(": ")
    type_name = type_name.rsplit(".", 1)[-1] if message and " " not in type_name else "Exception"
    return remote_error(task, {"type": type_name, "message": message or last})
