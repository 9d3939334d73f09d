"""The Celery app: dmipro's tasks on two queues, JSON only, at-least-once delivery.

Start a worker with ``dmipro worker celery`` or
``celery -A dmipro.workers.celery_app worker -Q dmipro.coordinator,dmipro.work -P threads``.

Configuration comes from dmipro's settings: ``DMIPRO_BROKER_URL`` and
``DMIPRO_RESULT_BACKEND`` (Redis by default). What the app sets, and why:

- **JSON only** (``accept_content=["json"]``): no pickle on the wire.
- **At least once**: ``task_acks_late`` + ``task_reject_on_worker_lost``, prefetch
  multiplier 1. A prefork child that dies has its task requeued at once; a whole worker
  that dies (SIGKILL, lost machine) has its unacknowledged messages redelivered by the
  Redis broker after ``DMIPRO_VISIBILITY_TIMEOUT`` seconds (default 3600, in broker and
  result-backend transport options). While a worker lives it keeps extending that
  timeout for every message it holds, so an LM task or a coordinator that runs for
  hours is never redelivered behind its back; each worker also sweeps for expired
  messages itself, so a dead worker's tasks come back even while every live worker is
  busy. Task bodies are idempotent, so a second run is harmless, and the coordinator
  consumes each task id once (a coordinator delivered twice waits on the job's lease,
  see :mod:`dmipro.workers._coordinate`).
- **Two queues** (``dmipro.coordinator`` for ``dmipro.optimize``, ``dmipro.work`` for
  everything else), so coordinators never starve the work slots.
- **Visible in Flower**: task events on (``worker_send_task_events``,
  ``task_send_sent_event``), ``task_track_started``, and the coordinator reports its
  progress as task state ``PROGRESS`` with meta ``{phase, trials_done, trials_total,
  best_score, lm_calls, tokens, ...}``.
- **No job left behind**: a worker consuming ``dmipro.coordinator`` runs the reconciler
  (:mod:`dmipro.workers._reconcile`), which sends a job's coordinator again when its
  message was lost (``DMIPRO_RECONCILE_INTERVAL``, ``DMIPRO_RECONCILE_GRACE``).

Every task in :mod:`dmipro.tasks` is registered as ``dmipro.<name>`` by one generic
wrapper that calls :func:`dmipro.tasks.execute` on the JSON payload (a string argument).
A task body's :class:`~dmipro.errors.DmiproError` is stored as that type with its
message; the Celery executor turns it back into the same error for the coordinator.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from typing import Any

from dmipro.defaults import COORDINATOR_QUEUE, WORK_QUEUE
from dmipro.errors import ConfigError

try:
    from celery import Celery, Task, signals
    from kombu.entity import Exchange, Queue
except ImportError as _exc:  # pragma: no cover - depends on the installed extras
    raise ConfigError("the Celery executor needs the celery extra: pip install 'dmipro[celery]'") from _exc

__all__ = [
    "TASK_PREFIX",
    "TRACE_HEADER",
    "coordinator_task_id",
    "get_app",
    "make_app",
    "revoke_optimize",
    "send_optimize",
    "task_name",
]

log = logging.getLogger(__name__)

TASK_PREFIX = "dmipro."
"""Celery task names are ``dmipro.<registry name>``: ``dmipro.evaluate_chunk``, ... ``dmipro.optimize``."""

TRACE_HEADER = "dmipro_trace"
"""Message header carrying the W3C trace context of the code that sent the task."""

EXCHANGE = "dmipro"
"""The direct exchange both queues are bound to, by their own names as routing keys."""

RESULT_EXPIRES_S = 7 * 24 * 3600
"""How long task results stay in the result backend."""


def task_name(task: str) -> str:
    """The Celery name of registry task ``task``."""
    return TASK_PREFIX + task


def coordinator_task_id(job_id: str) -> str:
    """The Celery task id of a job's coordinator (one per job, so status can find it)."""
    return f"optimize-{job_id}"


def _config(broker_url: str, result_backend: str) -> dict[str, Any]:
    from dmipro.workers._coordinate import visibility_timeout

    vt = visibility_timeout()
    # kombu sweeps for expired messages every interval x throttle seconds; keep that well
    # under the visibility timeout so a short one (tests, fast failover) means quick redelivery.
    restore_interval = max(1, min(10, int(vt // 5)))
    transport = {
        "visibility_timeout": vt,
        "unacked_restore_interval": restore_interval,
        "unacked_restore_throttle": 1 if vt <= 120 else 10,
    }
    from dmipro.tasks import task_names

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
        "result_expires": RESULT_EXPIRES_S,
        "task_track_started": True,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_default_queue": WORK_QUEUE,
        "task_default_exchange": EXCHANGE,
        "task_queues": (
            _queue(COORDINATOR_QUEUE),
            _queue(WORK_QUEUE),
        ),
        "task_routes": {
            task_name(name): {"queue": COORDINATOR_QUEUE if name == "optimize" else WORK_QUEUE}
            for name in task_names()
        },
        "enable_utc": True,
    }


def _queue(name: str) -> Queue:
    return Queue(name, Exchange(EXCHANGE, type="direct"), routing_key=name)  # type: ignore[no-untyped-call]


def make_app(broker_url: str | None = None, result_backend: str | None = None) -> Celery:
    """A new Celery app with every dmipro task registered (URLs default to the settings)."""
    from dmipro.config import get_settings

    settings = get_settings()
    broker_url = broker_url or settings.broker_url
    result_backend = result_backend or settings.result_backend
    app = Celery("dmipro", set_as_current=False)
    app.conf.update(_config(broker_url, result_backend))
    _register_tasks(app)
    return app


_apps: dict[tuple[str, str], Celery] = {}
_apps_lock = threading.Lock()


def get_app() -> Celery:
    """This process's app for the current settings' broker and result backend."""
    from dmipro.config import get_settings

    settings = get_settings()
    key = (settings.broker_url, settings.result_backend)
    with _apps_lock:
        app = _apps.get(key)
        if app is None:
            app = _apps[key] = make_app(*key)
        return app


def __getattr__(name: str) -> Any:
    # ``celery -A dmipro.workers.celery_app`` looks for ``app``; build it on first use so that
    # importing this module reads no settings. In those processes (worker, flower) it is the
    # current app, so code that uses Celery's default app (Flower's result API) finds its backend.
    if name in ("app", "celery"):
        app = get_app()
        app.set_current()
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- tasks -------------------------------------------------------------------------------

def _trace_of(request: Any) -> dict[str, str] | None:
    carrier = getattr(request, TRACE_HEADER, None)
    if carrier is None and isinstance(getattr(request, "headers", None), dict):
        carrier = request.headers.get(TRACE_HEADER)
    return carrier if isinstance(carrier, dict) else None


def _register_tasks(app: Celery) -> None:
    from dmipro.tasks import task_names
    from dmipro.workers.setup import import_task_modules

    import_task_modules()
    for name in task_names():
        if name == "optimize":
            _register_optimize(app)
        else:
            _register_work(app, name)


def _register_work(app: Celery, name: str) -> None:
    def run(self: Task, body: str) -> dict[str, Any]:
        from dmipro import tracing
        from dmipro.tasks import execute
        from dmipro.workers.setup import setup_worker_process

        setup_worker_process()
        with tracing.attach(_trace_of(self.request)):
            return execute(name, body)

    run.__name__ = run.__qualname__ = re.sub(r"\W", "_", name)  # Celery builds a signature from it
    run.__doc__ = f"Run dmipro task {name!r} on a JSON payload (see dmipro.tasks)."
    app.task(name=task_name(name), bind=True, shared=False, acks_late=True, reject_on_worker_lost=True)(run)


def _register_optimize(app: Celery) -> None:
    def optimize(self: Task, body: str) -> dict[str, Any]:
        from dmipro import tracing
        from dmipro.workers._coordinate import run_coordinator
        from dmipro.workers.setup import setup_worker_process

        setup_worker_process()
        task_id = self.request.id

        def on_progress(progress: dict[str, Any]) -> None:
            if task_id:
                self.update_state(task_id=task_id, state="PROGRESS", meta=_jsonable(progress))

        with tracing.attach(_trace_of(self.request)):
            return run_coordinator(body, backend="celery", on_progress=on_progress)

    optimize.__doc__ = "Run or resume one optimization job (the coordinator); reports PROGRESS meta."
    app.task(name=task_name("optimize"), bind=True, shared=False, acks_late=True,
             reject_on_worker_lost=True)(optimize)


def _jsonable(data: dict[str, Any]) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(json.dumps(data, default=str, allow_nan=False))
    return decoded


def send_optimize(job_id: str, executor: str = "celery", *, app: Celery | None = None) -> str:
    """Enqueue a job's coordinator on ``dmipro.coordinator``; returns the Celery task id."""
    from dmipro import tracing

    app = app or get_app()
    body = json.dumps({"job_id": job_id, "executor": executor})
    task_id = coordinator_task_id(job_id)
    trace = tracing.inject()
    app.send_task(task_name("optimize"), args=[body], task_id=task_id, queue=COORDINATOR_QUEUE,
                  headers={TRACE_HEADER: trace} if trace else None, argsrepr=f"job_id={job_id}")
    return task_id


def revoke_optimize(job_id: str, *, app: Celery | None = None) -> None:
    """Keep a job's coordinator from starting if it is still queued (best effort)."""
    (app or get_app()).control.revoke(coordinator_task_id(job_id))


# -- worker process hooks ---------------------------------------------------------------

def _on_worker_process_init(**_: Any) -> None:
    from dmipro.workers.setup import setup_worker_process

    setup_worker_process()


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    # The thread pool runs tasks in this process and sends no worker_process_init; a prefork
    # parent must not set up here (its children would inherit threads across fork).
    pool = str(getattr(sender, "pool_cls", "") or "")
    if "prefork" not in pool and "processes" not in pool:
        from dmipro.workers.setup import setup_worker_process

        setup_worker_process()


class _DeliveryLeases:
    """Keeps the Redis broker's at-least-once promise for a worker's messages, alive or dead.

    kombu's Redis transport redelivers an unacknowledged message once its entry in the
    ``unacked_index`` sorted set is older than the visibility timeout. This thread (one
    per worker, in the main process) does two things:

    - it refreshes the entries of every message this worker has reserved or is running,
      so none is redelivered while the worker lives, however long the task runs;
    - it runs kombu's restore sweep on a channel of its own, so the messages of a worker
      that died come back after the timeout even when every live worker is busy (the
      thread pool's synchronous loop sweeps only when it is idle).
    """

    def __init__(self, app: Celery) -> None:
        import redis

        options = app.conf.broker_transport_options or {}
        self.app = app
        self.key = str(options.get("global_keyprefix", "")) + str(options.get("unacked_index_key",
                                                                             "unacked_index"))
        vt = float(options.get("visibility_timeout", 3600))
        self.refresh_every = max(0.5, min(60.0, vt / 4))
        self.restore_every = max(1.0, min(60.0, vt / 5))
        self.client = redis.Redis.from_url(app.conf.broker_url)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="dmipro-delivery-leases", daemon=True)

    def _run(self) -> None:
        next_restore = time.monotonic() + self.restore_every
        with self.app.connection_for_read() as conn:
            while not self.stop.wait(min(self.refresh_every, self.restore_every)):
                self._refresh()
                if time.monotonic() >= next_restore:
                    next_restore = time.monotonic() + self.restore_every
                    try:
                        channel = conn.default_channel
                        channel.qos.restore_visible(num=channel.unacked_restore_limit, interval=1)
                    except Exception as exc:
                        log.warning("restoring messages of lost workers failed: %s", exc)

    def _refresh(self) -> None:
        from celery.worker import state

        try:
            tags = [req.message.delivery_tag for req in list(state.requests.values())]
        except RuntimeError:  # the dict changed while copying; next beat
            return
        tags = [tag for tag in tags if tag]
        if not tags:
            return
        now = time.time()
        try:
            self.client.zadd(self.key, {tag: now for tag in tags}, xx=True)
        except Exception as exc:
            log.warning("extending the visibility of %d messages failed: %s", len(tags), exc)


_leases: _DeliveryLeases | None = None
_reconciler_stop = threading.Event()


def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    global _leases
    app = getattr(sender, "app", None)
    if app is None or not str(app.conf.broker_url).startswith(("redis://", "rediss://", "unix://")):
        return
    _leases = _DeliveryLeases(app)
    _leases.thread.start()
    if COORDINATOR_QUEUE in app.amqp.queues.consume_from:
        # Every coordinator worker re-sends jobs whose coordinator message was lost.
        from dmipro.workers._reconcile import start_reconciler

        start_reconciler("celery", _reconciler_stop)


def _on_worker_shutdown(**_: Any) -> None:
    _reconciler_stop.set()
    if _leases is not None:
        _leases.stop.set()


def _survive_broker_restarts() -> None:
    """Keep a worker alive when its Redis connection drops while it holds messages.

    On a lost connection the consumer closes its channel, and kombu 5.7's Redis transport
    then works on that channel through a connection that is already gone: restoring its
    unacknowledged messages, and later acknowledging the tasks that were still running,
    each raise ``AttributeError`` and end the whole worker ("Unrecoverable error"), with
    the coordinators it runs. So, on a channel whose connection is gone:

    - the restore is skipped: the messages stay in Redis's unacknowledged set (this worker
      keeps extending the ones it still runs, the sweep brings back the others after the
      visibility timeout), or they went with a restarted Redis and the executor and the
      reconciler send them again — restoring them would run live tasks twice;
    - acknowledgements go through a fresh connection to the broker, so a task that
      finished is not redelivered.
    """
    from contextlib import contextmanager

    from kombu.transport import redis as kombu_redis

    original_restore: Any = kombu_redis.QoS.restore_unacked
    original_conn: Any = kombu_redis.Channel.conn_or_acquire
    if getattr(original_restore, "_dmipro", False):
        return

    def gone(channel: Any) -> bool:
        return getattr(getattr(channel, "connection", None), "client", None) is None

    def restore_unacked(self: Any, client: Any = None) -> Any:
        if client is None and gone(self.channel):
            log.warning("the broker connection dropped; %d unacknowledged message(s) stay in Redis for "
                        "redelivery", len(self._delivered))
            return None
        return original_restore(self, client)

    @contextmanager
    def conn_or_acquire(self: Any, client: Any = None) -> Any:
        if client is None and gone(self):
            import redis

            from dmipro.config import get_settings

            fresh = redis.Redis.from_url(get_settings().broker_url)
            try:
                yield fresh
            finally:
                fresh.close()
            return
        with original_conn(self, client) as conn:
            yield conn

    restore_unacked._dmipro = True  # type: ignore[attr-defined]
    kombu_redis.QoS.restore_unacked = restore_unacked  # type: ignore[method-assign]
    kombu_redis.Channel.conn_or_acquire = conn_or_acquire  # type: ignore[method-assign]


_survive_broker_restarts()
signals.worker_process_init.connect(_on_worker_process_init, weak=False)
signals.worker_init.connect(_on_worker_init, weak=False)
signals.worker_ready.connect(_on_worker_ready, weak=False)
signals.worker_shutdown.connect(_on_worker_shutdown, weak=False)
