"""Celery: the wire protocol (app configuration, task names, the coordinator message) and the adapter.

**The app.** :func:`make_app` configures a Celery app for dmipro without registering a
task body: a client sends tasks by name, and only workers (:mod:`dmipro.workers.celery_app`)
register the bodies. What the configuration sets, and why:

- **JSON only** (``accept_content=["json"]``): no pickle on the wire.
- **At least once**: ``task_acks_late`` + ``task_reject_on_worker_lost``, prefetch
  multiplier 1. A whole worker that dies has its unacknowledged messages redelivered by
  the Redis broker after the ``visibility_timeout`` setting (``DMIPRO_VISIBILITY_TIMEOUT``,
  default 3600 s, in broker and result-backend transport options).
- **Two queues**: ``dmipro.optimize`` goes to ``dmipro.coordinator``, everything else to
  ``dmipro.work``, so coordinators never starve the work slots.
- **Visible in Flower**: task events on, ``task_track_started``.

**The coordinator message.** One ``dmipro.optimize`` message per job, with the task id
:func:`coordinator_task_id` (so status, cancel and the reconciler can find it) and the
sender's W3C trace context in the :data:`TRACE_HEADER` header.

**The adapter.** Shipping sends ``dmipro.<task>`` with the JSON payload as its one argument; collecting
reads the result backend for every task in flight in one round trip (``MGET`` on Redis)
from a background thread. Nothing ever calls ``AsyncResult.get()``, so a coordinator
running as a Celery task (``dmipro.optimize``) never blocks a worker slot on a result.

One gap the broker leaves is closed here. kombu's Redis transport pops a message from
the queue and only then records it as unacknowledged; a worker killed between the two
takes the message with it. A task that has not started ``lost_after_s`` seconds after it
was sent, and that is neither in its queue nor among the unacknowledged messages, is
sent again under the same id (bodies are idempotent and each id is consumed once).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from dmipro import tracing
from dmipro._imports import guarded
from dmipro.config import get_settings
from dmipro.defaults import CELERY_RESULT_EXPIRES_S, COORDINATOR_QUEUE, WORK_QUEUE
from dmipro.errors import DecodeError, DmiproError, TaskError
from dmipro.executor_adapters._remote import Outcome, RemoteAdapter, Shipment, remote_error

with guarded(extra="celery", purpose="the Celery executor"):
    from celery import Celery
    from kombu.entity import Exchange, Queue
    from redis import Redis

__all__ = [
    "OPTIMIZE_TASK",
    "TASK_PREFIX",
    "TRACE_HEADER",
    "CeleryAdapter",
    "child_tasks_of",
    "coordinator_task_id",
    "get_app",
    "make_app",
    "task_name",
]

log = logging.getLogger(__name__)

_SUCCESS, _FAILURE, _REVOKED = "SUCCESS", "FAILURE", "REVOKED"

TASK_PREFIX = "dmipro."
"""Celery task names are ``dmipro.<task table name>``: ``dmipro.evaluate_chunk``, ..."""

OPTIMIZE_TASK = TASK_PREFIX + "optimize"
"""The Celery name of a job's coordinator (not in the task table: only a worker holding the lease runs it)."""

TRACE_HEADER = "dmipro_trace"
"""Message header carrying the W3C trace context of the code that sent the task."""

EXCHANGE = "dmipro"
"""The direct exchange both queues are bound to, by their own names as routing keys."""


_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def task_name(task: str) -> str:
    """The Celery name of task-table task ``task``."""
    return TASK_PREFIX + task


def coordinator_task_id(job_id: str) -> str:
    """The Celery task id of a job's coordinator (one per job, so status can find it)."""
    return f"optimize-{job_id}"


_parent: ContextVar[str | None] = ContextVar("dmipro_celery_parent", default=None)


@contextmanager
def child_tasks_of(task_id: str | None) -> Iterator[None]:
    """Send the tasks shipped in this context as children of Celery task ``task_id``.

    The coordinator's worker wraps the run in it, so every work task carries the
    coordinator as its ``parent_id`` and ``root_id``: Flower links a job's tasks to it.
    Celery would do this itself, but tasks are sent from the adapter's collector thread,
    where Celery does not know which task is running.
    """
    token = _parent.set(task_id)
    try:
        yield
    finally:
        _parent.reset(token)


def _config(broker_url: str, result_backend: str) -> dict[str, Any]:
    vt = get_settings().visibility_timeout
    # kombu sweeps for expired messages every interval x throttle seconds; keep that well
    # under the visibility timeout so a short one (tests, fast failover) means quick redelivery.
    restore_interval = max(1, min(10, int(vt // 5)))
    transport = {
        "visibility_timeout": vt,
        "unacked_restore_interval": restore_interval,
        "unacked_restore_throttle": 1 if vt <= 120 else 10,
    }
    return {
        "broker_url": broker_url,
        "result_backend": result_backend,
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": transport,
        "result_backend_transport_options": {"visibility_timeout": vt},
        # A result that cannot be stored while Redis restarts is retried, not turned into a
        # FAILURE of a task whose body succeeded (the coordinator would fail the job on it).
        "result_backend_always_retry": True,
        "result_backend_max_retries": 30,
        "result_backend_max_sleep_between_retries_ms": 2000,
        "visibility_timeout": vt,
        "result_expires": CELERY_RESULT_EXPIRES_S,
        "task_track_started": True,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_default_queue": WORK_QUEUE,
        "task_default_exchange": EXCHANGE,
        "task_queues": (_queue(COORDINATOR_QUEUE), _queue(WORK_QUEUE)),
        "task_routes": {OPTIMIZE_TASK: {"queue": COORDINATOR_QUEUE}},
        "enable_utc": True,
    }


def _queue(name: str) -> Queue:
    return Queue(name, Exchange(EXCHANGE, type="direct"), routing_key=name)  # type: ignore[no-untyped-call]


def make_app(broker_url: str | None = None, result_backend: str | None = None) -> Celery:
    """A new Celery app configured for dmipro, with no task registered (URLs default to the settings)."""
    settings = get_settings()
    app = Celery("dmipro", set_as_current=False)
    app.conf.update(_config(broker_url or settings.broker_url, result_backend or settings.result_backend))
    return app


_apps: dict[tuple[Callable[..., Celery], str, str], Celery] = {}
_apps_lock = threading.Lock()


def get_app(factory: Callable[[str, str], Celery] | None = None) -> Celery:
    """This process's app for the current settings' broker and result backend, built once by
    ``factory`` (by default :func:`make_app`, a client's app; workers pass theirs)."""
    settings = get_settings()
    build = factory or make_app
    key = (build, settings.broker_url, settings.result_backend)
    with _apps_lock:
        app = _apps.get(key)
        if app is None:
            app = _apps[key] = build(settings.broker_url, settings.result_backend)
        return app


def _held_messages(app: Celery, queue: str) -> bytes | None:
    """Every message in ``queue`` or unacknowledged, as one blob to search; None if not Redis."""
    if not str(app.conf.broker_url).startswith(_REDIS_SCHEMES):
        return None
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        client = channel.client
        parts = list(client.hvals(channel.unacked_key))
        for priority in channel.priority_steps:
            parts += client.lrange(channel._q_for_pri(queue, priority), 0, -1)
    return b"\0".join(p if isinstance(p, bytes) else str(p).encode() for p in parts)


class CeleryAdapter(RemoteAdapter):
    """Runs tasks on Celery workers consuming ``queue``; results come from the result backend.

    ``concurrency`` is the number of worker slots the job may fill (it sizes trial
    batches); Celery's queue holds whatever does not fit.
    """

    name = "celery"

    def __init__(self, concurrency: int = 16, *, app: Celery | None = None, queue: str = WORK_QUEUE,
                 poll_interval: float = 0.05, priority: float = 1.0) -> None:
        super().__init__(concurrency, poll_interval=poll_interval, priority=priority)
        self.app = app or get_app()
        self.queue = queue
        vt = float((self.app.conf.broker_transport_options or {}).get("visibility_timeout", 3600))
        self.lost_after_s = min(vt, 30.0)
        """Seconds a sent task may go without starting before the executor looks for it."""
        self._sent_at: dict[str, float] = {}
        self._next_lost_check = 0.0

    def _send(self, shipments: list[Shipment]) -> None:
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
                        parent_id=s.parent, root_id=s.parent, **limits,
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
        held = _held_messages(self.app, self.queue)
        if held is None:
            return
        lost = [tid for tid in old if tid.encode() not in held]
        with self._lock:
            shipments = [self._pending[tid][0] for tid in lost if tid in self._pending]
        if shipments:
            log.warning("%d %s task(s) vanished from the broker before starting (a worker died while "
                        "receiving them); sending them again", len(shipments), self.queue)
            self._send(shipments)

    def _parent_task(self) -> str | None:
        return _parent.get()

    def _fair_client(self) -> Any:
        url = str(self.app.conf.broker_url)
        if not url.startswith(_REDIS_SCHEMES):
            return None
        return Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)

    def _task_names(self, ids: list[str]) -> dict[str, str]:
        with self._lock:
            return {tid: self._pending[tid][0].task for tid in ids if tid in self._pending}

    def _revoke(self, ids: list[str], *, terminate: bool = False) -> None:
        if ids:
            self.app.control.revoke(ids, terminate=terminate, signal="SIGKILL" if terminate else "SIGTERM")

    # -- a job's coordinator message -----------------------------------------------------
    @classmethod
    def check_broker(cls) -> None:
        with get_app().connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=5)

    @classmethod
    def enqueue_coordinator(cls, job_id: str, executor: str | None = None) -> str:
        body = json.dumps({"job_id": job_id, "executor": executor or cls.name})
        task_id = coordinator_task_id(job_id)
        trace = tracing.inject()
        get_app().send_task(OPTIMIZE_TASK, args=[body], task_id=task_id, queue=COORDINATOR_QUEUE,
                            headers={TRACE_HEADER: trace} if trace else None, argsrepr=f"job_id={job_id}")
        return task_id

    @classmethod
    def cancel_coordinator(cls, job_id: str) -> None:
        get_app().control.revoke(coordinator_task_id(job_id))

    @classmethod
    def coordinator_consumers(cls, timeout: float = 1.0) -> int:
        replies = get_app().control.inspect(timeout=timeout).active_queues() or {}
        names = [{q.get("name") for q in queues or []} for queues in replies.values()]
        return sum(1 for queues in names if COORDINATOR_QUEUE in queues)

    @classmethod
    def held_coordinators(cls, job_ids: list[str]) -> set[str]:
        blob = _held_messages(get_app(), COORDINATOR_QUEUE)
        if blob is None:  # not Redis: nothing to look into, so nothing is reported lost
            return set(job_ids)
        return {j for j in job_ids if coordinator_task_id(j).encode() in blob}


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
        info = {"exc_type": type(info).__name__, "exc_message": list(info.args)}
    if not isinstance(info, dict):
        return remote_error(task, {"type": "Exception", "message": str(info)})
    args = info.get("exc_message")
    if isinstance(args, list | tuple) and len(args) == 2 and isinstance(args[1], dict) and "type" in args[1]:
        return remote_error(task, args[1])  # a dmipro worker's error record (see workers.celery_app)
    if isinstance(args, list | tuple):
        message = str(args[0]) if len(args) == 1 else ", ".join(str(a) for a in args)
    else:
        message = str(args or "")
    return remote_error(task, {"type": str(info.get("exc_type") or "Exception"), "message": message})


def _summary(body: str) -> str:
    """A short, readable stand-in for the payload in Flower and worker logs."""
    try:
        payload = json.loads(body) if len(body) < 1_000_000 else {}
    except json.JSONDecodeError:
        payload = {}
    parts = [f"{key}={payload[key]}" for key in ("job", "job_id", "trial", "index", "predictor")
             if isinstance(payload, dict) and key in payload]
    return f"({', '.join(parts + [f'{len(body)} bytes'])})"
