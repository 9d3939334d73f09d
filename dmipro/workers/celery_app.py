"""The Celery worker app: dmipro's task bodies and the coordinator, registered on the adapter's configuration.

Start a worker with ``dmipro worker celery`` or
``celery -A dmipro.workers.celery_app worker -Q dmipro.coordinator,dmipro.work -P threads``.

The configuration (JSON only, at-least-once delivery, two queues, Flower events) and
the wire protocol (task names, the trace header, the coordinator message) are the
Celery adapter's, :mod:`dmipro.executor_adapters.celery`; this module adds what only a
worker needs:

- **the task bodies**: every task in the task table is registered as ``dmipro.<name>``
  by one generic wrapper that calls :func:`~dmipro.executor_adapters.task_table.execute`
  on the JSON payload (a string argument), and ``dmipro.optimize`` runs the job's
  coordinator (:func:`dmipro.workers.optimize.run_coordinator`), reporting its progress
  as task state ``PROGRESS`` with meta ``{phase, trials_done, trials_total, best_score,
  lm_calls, tokens, ...}`` (Flower shows it). A task body's
  :class:`~dmipro.errors.DmiproError` is stored as that type with its message; the
  Celery executor turns it back into the same error for the coordinator;
- **delivery leases**: while a worker lives it keeps extending the Redis broker's
  visibility timeout for every message it holds, so an LM task or a coordinator that
  runs for hours is never redelivered behind its back; each worker also sweeps for
  expired messages itself, so a dead worker's tasks come back even while every live
  worker is busy;
- **no job left behind**: a worker consuming ``dmipro.coordinator`` runs the reconciler
  (:mod:`dmipro.workers._reconcile`), which sends a job's coordinator again when its
  message was lost (``DMIPRO_RECONCILE_INTERVAL``, ``DMIPRO_RECONCILE_GRACE``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dmipro import tracing
from dmipro._imports import guarded
from dmipro.config import get_settings
from dmipro.defaults import COORDINATOR_QUEUE
from dmipro.executor_adapters import celery as protocol
from dmipro.executor_adapters._remote import error_record
from dmipro.executor_adapters.celery import OPTIMIZE_TASK, TRACE_HEADER, task_name
from dmipro.executor_adapters.task_table import execute, task_names
from dmipro.workers._reconcile import start_reconciler
from dmipro.workers.optimize import run_coordinator
from dmipro.workers.setup import import_task_modules, setup_worker_process

with guarded(extra="celery", purpose="the Celery worker"):
    import redis
    from celery import Celery, Task, signals
    from celery.utils.saferepr import saferepr
    from celery.worker import state as worker_state
    from kombu.transport import redis as kombu_redis

import dmipro.tasks  # noqa: E402,F401  (registers dmipro's task bodies in the task table)

__all__ = ["FLOWER_TASK_COLUMNS", "get_app", "make_app"]

log = logging.getLogger(__name__)

FLOWER_TASK_COLUMNS = "name,uuid,state,args,result,received,runtime,worker,exception"
"""Flower's task-list columns: the id and ``args`` name each task's job (and trial), ``result`` shows
an evaluation's errored and failed examples first. ``dmipro flower`` passes them; under
``celery -A dmipro.workers.celery_app flower`` the default below applies (``FLOWER_TASKS_COLUMNS``
is Flower's own setting, read after the app is loaded; a value already set wins)."""
os.environ.setdefault("FLOWER_TASKS_COLUMNS", FLOWER_TASK_COLUMNS)


def make_app(broker_url: str | None = None, result_backend: str | None = None) -> Celery:
    """A new worker app: the adapter's configuration with every task body registered."""
    app = protocol.make_app(broker_url, result_backend)
    _register_tasks(app)
    return app


def get_app() -> Celery:
    """This process's worker app for the current settings' broker and result backend."""
    return protocol.get_app(make_app)


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


@contextmanager
def _errors_as_records() -> Iterator[None]:
    """Let a task's exception carry its error record as its second argument: Celery stores the
    arguments as JSON, and the executor rebuilds the same error from them (``remote_error``)."""
    try:
        yield
    except Exception as exc:
        exc.args = (str(exc), error_record(exc))
        raise


def _register_tasks(app: Celery) -> None:
    import_task_modules()
    for name in task_names():
        _register_work(app, name)
    _register_optimize(app)


def _register_work(app: Celery, name: str) -> None:
    def run(self: Task, body: str) -> dict[str, Any]:
        setup_worker_process()
        with tracing.attach(_trace_of(self.request)), _errors_as_records():
            return execute(name, body)

    run.__name__ = run.__qualname__ = re.sub(r"\W", "_", name)  # Celery builds a signature from it
    run.__doc__ = f"Run dmipro task {name!r} on a JSON payload (see dmipro.tasks)."
    app.task(name=task_name(name), bind=True, shared=False, acks_late=True, reject_on_worker_lost=True)(run)


def _register_optimize(app: Celery) -> None:
    def optimize(self: Task, body: str) -> dict[str, Any]:
        setup_worker_process()
        task_id = self.request.id

        def on_progress(progress: dict[str, Any]) -> None:
            if not task_id:
                return
            meta = _jsonable(progress)
            self.update_state(task_id=task_id, state="PROGRESS", meta=meta)
            # Flower's task list and API follow events, not the result backend: a custom
            # task-progress event sets the task's state to PROGRESS and its result column to the
            # progress (phase, trials, best score, LM use), until task-succeeded replaces it.
            try:
                self.send_event("task-progress", result=saferepr(meta))
            except Exception as exc:  # monitoring must never fail the job
                log.warning("sending the progress event failed: %s", exc)

        with tracing.attach(_trace_of(self.request)), protocol.child_tasks_of(task_id), _errors_as_records():
            return run_coordinator(body, backend="celery", on_progress=on_progress)

    optimize.__doc__ = "Run or resume one optimization job (the coordinator); reports PROGRESS meta."
    app.task(name=OPTIMIZE_TASK, bind=True, shared=False, acks_late=True,
             reject_on_worker_lost=True)(optimize)


def _jsonable(data: dict[str, Any]) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(json.dumps(data, default=str, allow_nan=False))
    return decoded


# -- worker process hooks ---------------------------------------------------------------

def _on_worker_process_init(**_: Any) -> None:
    setup_worker_process()


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    # The thread pool runs tasks in this process and sends no worker_process_init; a prefork
    # parent must not set up here (its children would inherit threads across fork).
    pool = str(getattr(sender, "pool_cls", "") or "")
    if "prefork" not in pool and "processes" not in pool:
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
        try:
            tags = [req.message.delivery_tag for req in list(worker_state.requests.values())]
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
        start_reconciler("celery", _reconciler_stop)


def _on_worker_shutting_down(how: str | None = None, **_: Any) -> None:
    # Warm shutdown (SIGTERM) waits for every running task; a task stuck in a metric that never
    # returns would hold the worker until the kubelet's SIGKILL, and its message until the
    # visibility timeout. With a grace, stuck tasks go back to the broker at its end.
    grace = get_settings().shutdown_grace
    if how == "Warm" and grace > 0:
        threading.Thread(target=_give_back_after, args=(grace,), name="dmipro-shutdown-grace",
                         daemon=True).start()


def _give_back_after(grace: float) -> None:
    """Wait ``grace`` seconds for the running tasks; then requeue every task this worker holds and exit.

    Bodies are idempotent and the coordinator consumes each task id once, so a task given back
    mid-run is simply run again elsewhere. The process exits at once (``os._exit``): a stuck
    thread cannot be stopped, and a normal exit would wait for it.
    """
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not worker_state.active_requests:
            return  # everything finished in time: Celery's warm shutdown completes normally
        time.sleep(0.1)
    held = list(worker_state.reserved_requests)
    log.error("%d task(s) still running %gs after the worker was told to stop; giving them back to the "
              "broker and exiting", len(held), grace)
    for request in held:
        # On the message itself: Request.reject only schedules the reject on the consumer's
        # event loop, which has stopped by now, so nothing would reach the broker before the exit.
        try:
            request.message.reject(requeue=True)
        except Exception as exc:  # the broker unreachable: the visibility timeout brings it back instead
            log.warning("giving back task %s failed: %s", request.id, exc)
    logging.shutdown()
    os._exit(1)


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
    def conn_or_acquire(self: Any, client: Any = None) -> Iterator[Any]:
        if client is None and gone(self):
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
signals.worker_shutting_down.connect(_on_worker_shutting_down, weak=False)
