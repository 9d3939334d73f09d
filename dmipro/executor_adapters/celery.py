"""Tasks on Celery workers, through the ``dmipro.work`` queue.

Shipping sends ``dmipro.<task>`` with the JSON payload as its one argument; collecting
reads the result backend for every task in flight in one round trip (``MGET`` on Redis)
from a background thread. Nothing ever calls ``AsyncResult.get()``, so a coordinator
running as a Celery task (``dmipro.optimize``) never blocks a worker slot on a result.
See :mod:`dmipro.workers.celery_app` for the delivery guarantees.

One gap the broker leaves is closed here. kombu's Redis transport pops a message from
the queue and only then records it as unacknowledged; a worker killed between the two
takes the message with it. A task that has not started ``lost_after_s`` seconds after it
was sent, and that is neither in its queue nor among the unacknowledged messages, is
sent again under the same id (bodies are idempotent and each id is consumed once).
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

from dmipro.defaults import WORK_QUEUE
from dmipro.errors import DecodeError, DmiproError, TaskError
from dmipro.executor_adapters._remote import Outcome, RemoteExecutor, Shipment, remote_error

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["CeleryExecutor"]

log = logging.getLogger(__name__)

_SUCCESS, _FAILURE, _REVOKED = "SUCCESS", "FAILURE", "REVOKED"


class CeleryExecutor(RemoteExecutor):
    """Runs tasks on Celery workers consuming ``queue``; results come from the result backend.

    ``concurrency`` is the number of worker slots the job may fill (it sizes trial
    batches); Celery's queue holds whatever does not fit.
    """

    name = "celery"

    def __init__(self, concurrency: int = 16, *, app: Celery | None = None, queue: str = WORK_QUEUE,
                 poll_interval: float = 0.05, priority: float = 1.0) -> None:
        from dmipro.workers.celery_app import get_app

        super().__init__(concurrency, poll_interval=poll_interval, priority=priority)
        self.app = app or get_app()
        self.queue = queue
        vt = float((self.app.conf.broker_transport_options or {}).get("visibility_timeout", 3600))
        self.lost_after_s = min(vt, 30.0)
        """Seconds a sent task may go without starting before the executor looks for it."""
        self._sent_at: dict[str, float] = {}
        self._next_lost_check = 0.0
        self._broker: Any = None

    def _send(self, shipments: list[Shipment]) -> None:
        from dmipro import tracing
        from dmipro.workers.celery_app import TRACE_HEADER, task_name

        with self.app.producer_or_acquire() as producer:
            for s in shipments:
                # Publish in the submitter's trace, so Celery's own spans join the run's trace.
                limit = self.deadline_for(s.task)
                # Time limits stop a stuck task in prefork and solo pools; a thread pool cannot
                # interrupt a thread, so there the coordinator's own deadline is what frees the job.
                limits = {"soft_time_limit": limit, "time_limit": limit + 30} if limit else {}
                with tracing.attach(s.trace):
                    self.app.send_task(
                        task_name(s.task), args=[s.body], task_id=s.id, queue=self.queue, producer=producer,
                        headers={TRACE_HEADER: s.trace} if s.trace else None, argsrepr=_summary(s.body),
                        **limits,
                    )
                self._sent_at[s.id] = time.monotonic()

    def _fetch(self, ids: list[str]) -> dict[str, Outcome]:
        backend = self.app.backend
        metas: dict[str, Any] = {}
        if hasattr(backend, "mget") and hasattr(backend, "get_key_for_task"):
            values = backend.mget([backend.get_key_for_task(tid) for tid in ids])
            for tid, raw in zip(ids, values, strict=True):
                if raw is not None:
                    metas[tid] = backend.decode(raw)
        else:  # a backend without bulk reads: one query per task
            for tid in ids:
                metas[tid] = backend.get_task_meta(tid)
        tasks = self._task_names(ids)
        out: dict[str, Outcome] = {}
        for tid, meta in metas.items():
            if isinstance(meta, dict) and meta.get("status") == "STARTED":
                self._mark_started(tid)
            outcome = _outcome(tasks.get(tid, "?"), meta)
            if outcome is not None:
                out[tid] = outcome
                self._sent_at.pop(tid, None)
        self._resend_lost([tid for tid in ids if tid not in metas])
        return out

    def _resend_lost(self, unstarted: list[str]) -> None:
        """Send again the tasks that have not started and that the broker no longer holds."""
        now = time.monotonic()
        old = [tid for tid in unstarted if now - self._sent_at.get(tid, now) > self.lost_after_s]
        if not old or now < self._next_lost_check:
            return
        self._next_lost_check = now + self.lost_after_s / 2
        held = self._held_by_broker()
        if held is None:
            return
        lost = [tid for tid in old if tid.encode() not in held]
        with self._lock:
            shipments = [self._pending[tid][0] for tid in lost if tid in self._pending]
        if shipments:
            log.warning("%d %s task(s) vanished from the broker before starting (a worker died while "
                        "receiving them); sending them again", len(shipments), self.queue)
            self._send(shipments)

    def _held_by_broker(self) -> bytes | None:
        """Every message in the queue or unacknowledged, as one blob to search; None if not Redis."""
        if not str(self.app.conf.broker_url).startswith(("redis://", "rediss://", "unix://")):
            return None
        if self._broker is None:
            self._broker = self.app.connection_for_read()
        channel = self._broker.default_channel
        client = channel.client
        parts = list(client.hvals(channel.unacked_key))
        for priority in channel.priority_steps:
            parts += client.lrange(channel._q_for_pri(self.queue, priority), 0, -1)
        return b"\0".join(p if isinstance(p, bytes) else str(p).encode() for p in parts)

    def _fair_client(self) -> Any:
        url = str(self.app.conf.broker_url)
        if not url.startswith(("redis://", "rediss://", "unix://")):
            return None
        from redis import Redis

        return Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)

    def close(self) -> None:
        super().close()
        if self._broker is not None:
            self._broker.release()
            self._broker = None

    def _task_names(self, ids: list[str]) -> dict[str, str]:
        with self._lock:
            return {tid: self._pending[tid][0].task for tid in ids if tid in self._pending}

    def _revoke(self, ids: list[str], *, terminate: bool = False) -> None:
        if ids:
            self.app.control.revoke(ids, terminate=terminate, signal="SIGKILL" if terminate else "SIGTERM")


def _outcome(task: str, meta: Any) -> Outcome | None:
    if not isinstance(meta, dict):
        return Outcome(error=DecodeError(f"task {task}: the result backend holds {type(meta).__name__}, "
                                         "not a task state"))
    status = meta.get("status")
    if status == _SUCCESS:
        result = meta.get("result")
        if not isinstance(result, dict):
            return Outcome(error=DecodeError(f"task {task} returned {type(result).__name__}, "
                                             "not a JSON object"))
        return Outcome(result=result)
    if status == _FAILURE:
        return Outcome(error=_failure(task, meta.get("result")))
    if status == _REVOKED:
        return Outcome(error=TaskError(f"task {task} was revoked before it ran", task=task,
                                       error_type="TaskRevokedError"))
    return None


def _failure(task: str, info: Any) -> DmiproError:
    if isinstance(info, BaseException):  # a backend that decodes exceptions itself
        return remote_error(task, type(info).__name__, str(info))
    if isinstance(info, dict):
        type_name = str(info.get("exc_type") or "Exception")
        args = info.get("exc_message")
        if isinstance(args, list | tuple):
            message = str(args[0]) if len(args) == 1 else ", ".join(str(a) for a in args)
        else:
            message = str(args or "")
        return remote_error(task, type_name, message)
    return remote_error(task, "Exception", str(info))


def _summary(body: str) -> str:
    """A short, readable stand-in for the payload in Flower and worker logs."""
    try:
        payload = json.loads(body) if len(body) < 1_000_000 else {}
    except json.JSONDecodeError:
        payload = {}
    parts = [f"{key}={payload[key]}" for key in ("job", "job_id", "trial", "index", "predictor")
             if isinstance(payload, dict) and key in payload]
    return f"({', '.join(parts + [f'{len(body)} bytes'])})"
