"""What the Celery and RQ adapters share: an outbox, one collector thread, error decoding.

A remote adapter's ``_ship`` puts the task in an outbox and returns a future at once, so
the coordinating thread never waits on the broker. One background thread per adapter
sends the outbox in batches (``_send``), polls the results of everything in flight
(``_fetch``) and completes the futures. It polls result state and never blocks on a
result, so a coordinator running as a task never holds a worker slot waiting on a
``.get()``.

Each remote task id is consumed once: its first final outcome completes the future and
the id is forgotten. A task the broker delivered twice (after a worker crash) therefore
never counts twice. A future cancelled by the caller is revoked remotely (``_revoke``).

Backends override three hooks, all called on the collector thread only:
``_send(shipments)``, ``_fetch(ids) -> {id: Outcome}`` (ids without a final outcome are
left out; a backend calls ``_mark_started(id)`` when it sees a task running) and
``_revoke(ids)``.

A coordinator watches its job (:meth:`~RemoteAdapter.watch`): every task gets a deadline
(seconds from when it was seen running, by task name), past which its future fails with
a ``TaskError`` (``error_type="TaskDeadlineExceeded"``) and the task is revoked; and once
the job's cancel flag is set, the coordinator gets ``cancel_grace_s`` to stop at its next
batch boundary (keeping the best program so far); tasks still in flight after that are
revoked and their futures fail (``error_type="JobCancelled"``), so ``cancel`` never waits
for a stuck task.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

from dmipro import errors, tracing
from dmipro.config import get_settings
from dmipro.errors import DmiproError, ExecutorError, TaskError
from dmipro.executor_adapters._fair import FairShare
from dmipro.executor_adapters.base import ExecutorAdapter

__all__ = [
    "ERROR_FIELDS", "Outcome", "RemoteAdapter", "Shipment", "error_record", "new_task_id", "remote_error",
]

log = logging.getLogger(__name__)



def new_task_id(job_id: str | None = None, task: str | None = None) -> str:
    """A fresh remote task id: ``<job>-<task>-<uuid>`` when the job is known, so Flower's task list and
    RQ's registries show which job a task belongs to (letters, digits, ``_`` and ``-``: valid for both)."""
    unique = uuid.uuid4().hex
    if not job_id or not task:
        return unique
    unique = unique[:16]  # 64 random bits: unique among a job's tasks, short enough for Flower's list
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{job_id}-{task}") + "-" + unique


@dataclass(frozen=True)
class Shipment:
    """One task on its way to a broker: its remote id, name, JSON body, trace context and parent task."""

    id: str
    task: str
    body: str
    trace: dict[str, str] = field(default_factory=dict)
    parent: str | None = None
    """The broker's id of the task that sent this one (a coordinator), when there is one."""


@dataclass(frozen=True)
class Outcome:
    """The final outcome of one remote task: its JSON result, or the error it raised."""

    result: dict[str, Any] | None = None
    error: DmiproError | None = None


ERROR_FIELDS = ("field", "task", "error_type", "status", "provider", "retry_after")
"""The attributes of dmipro's errors that travel with a task's error record."""


def error_record(exc: BaseException) -> dict[str, Any]:
    """A task's error as the JSON a worker sends back: ``type``, ``message`` and the error's fields.

    The RQ worker stores it in the job's ``meta["error"]``; the Celery worker carries it as
    the exception's second argument, so the result backend keeps it with the failure.
    """
    record: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    for name in ERROR_FIELDS:
        value = getattr(exc, name, None)
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            record[name] = value
    return record


def remote_error(task: str, record: dict[str, Any]) -> DmiproError:
    """The error a worker reported (an :func:`error_record`), as the caller should see it.

    A :class:`~dmipro.errors.DmiproError` subclass comes back as that class with its
    message and fields (a worker refusing a reference is still a ``RefError`` naming its
    ``field``); anything else becomes a :class:`~dmipro.errors.TaskError` naming the
    original type.
    """
    type_name = str(record.get("type") or "Exception")
    message = str(record.get("message", ""))
    cls = getattr(errors, type_name, None) if type_name in errors.__all__ else None
    if not (isinstance(cls, type) and issubclass(cls, DmiproError)):
        return TaskError(f"task {task} failed on a worker: {type_name}: {message}", task=task,
                         error_type=type_name)
    # Rebuilt without its constructor, which may format the message again (JobSpecError
    # prefixes the field): the message is the worker's, word for word.
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    if isinstance(error, TaskError):
        error.task, error.error_type = task, type_name
    if isinstance(error, errors.JobSpecError):
        error.field = None
    if isinstance(error, errors.LMError):
        error.retry_after = error.status = error.provider = None
    for name in ERROR_FIELDS:
        if name in record and isinstance(record[name], str | int | float):
            setattr(error, name, record[name])
    return error


class RemoteAdapter(ExecutorAdapter):
    """Base of the adapters that run tasks in worker processes; see the module docstring.

    Thread safety: ``_ship`` and ``close`` may be called from any thread; the hooks run on
    the collector thread only, so backends need no locking of their own.
    """

    remote = True
    concurrent_submit = True
    poll_min_s: float = 0.002
    """Poll again this soon after results arrived or tasks were sent."""
    broker_failure_s: float = 300.0
    """Fail every task in flight when the broker stays unreachable this long."""
    cancel_grace_s: float = 10.0
    """After a cancel, how long the coordinator may finish its batch before tasks in flight are revoked."""

    def __init__(self, concurrency: int = 16, *, poll_interval: float = 0.05, priority: float = 1.0) -> None:
        super().__init__(concurrency)
        if priority <= 0:
            raise ExecutorError(f"priority must be positive, got {priority}")
        self.priority = priority
        """This job's weight in the fleet's fair share (see :mod:`._fair`)."""
        self._fair: FairShare | None = None
        self._fair_ready = False
        self.poll_interval = max(poll_interval, self.poll_min_s)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._outbox: list[tuple[Shipment, Future[dict[str, Any]]]] = []
        self._pending: dict[str, tuple[Shipment, Future[dict[str, Any]]]] = {}
        self._thread: threading.Thread | None = None
        self._closed = False
        self.deadlines: dict[str, float] = {}
        """Seconds a task may run once started, by task name (``"*"``: the rest); empty: no limit."""
        self._cancelled: Callable[[], bool] | None = None
        self._next_cancel_check = 0.0
        self._cancel_seen: float | None = None
        self._started: dict[str, float] = {}
        self.job_id: str | None = None
        """The job whose tasks this adapter ships (set by :meth:`watch`), named in each task id."""

    def watch(self, *, deadlines: dict[str, float] | None = None,
              cancelled: Callable[[], bool] | None = None, job_id: str | None = None) -> None:
        """Give tasks ``deadlines``, stop everything in flight once ``cancelled()`` says so, and name
        the tasks after ``job_id``."""
        with self._lock:
            if deadlines is not None:
                self.deadlines = dict(deadlines)
            self._cancelled = cancelled
            self.job_id = job_id
        self._wake.set()

    def deadline_for(self, task: str) -> float | None:
        """The deadline of ``task`` in seconds, or None."""
        return self.deadlines.get(task, self.deadlines.get("*"))

    def _mark_started(self, tid: str) -> None:
        """Backends call this when they see ``tid`` running; its deadline counts from now."""
        self._started.setdefault(tid, time.monotonic())

    # -- backend hooks ---------------------------------------------------------------
    def _send(self, shipments: list[Shipment]) -> None:
        """Enqueue ``shipments`` on the broker, as one batch where the broker allows."""
        raise NotImplementedError

    def _fetch(self, ids: list[str]) -> dict[str, Outcome]:
        """The final outcomes among ``ids``; a task still queued or running is left out."""
        raise NotImplementedError

    def _revoke(self, ids: list[str], *, terminate: bool = False) -> None:
        """Best effort: keep these tasks from running; ``terminate`` also stops them if running."""

    def _fair_client(self) -> Any:
        """The Redis client the fair share between jobs is agreed through; None: no fair share."""
        return None

    def _parent_task(self) -> str | None:
        """The broker's id of the task shipping now (called on the shipping thread); None: none."""
        return None

    # -- a job's coordinator message: the wire protocol of ``optimize`` --------------
    # A job on workers is one coordinator message on ``dmipro.coordinator``; a worker that
    # takes it runs the job (see :mod:`dmipro.workers.optimize`). Submitting, cancelling,
    # status and the reconciler speak to it through these, whatever the broker.
    @classmethod
    def check_broker(cls) -> None:
        """Raise when the broker cannot be reached now."""
        raise NotImplementedError

    @classmethod
    def enqueue_coordinator(cls, job_id: str, executor: str | None = None) -> str:
        """Send job ``job_id``'s coordinator (its work tasks go to ``executor``, by default this
        backend); returns the message id."""
        raise NotImplementedError

    @classmethod
    def resend_coordinator(cls, job_id: str, executor: str) -> str:
        """Send the coordinator again after its message was lost."""
        return cls.enqueue_coordinator(job_id, executor)

    @classmethod
    def cancel_coordinator(cls, job_id: str) -> None:
        """Keep a job's coordinator from starting if it is still queued (best effort)."""
        raise NotImplementedError

    @classmethod
    def coordinator_consumers(cls, timeout: float = 1.0) -> int:
        """How many live workers consume ``dmipro.coordinator``, asked now."""
        raise NotImplementedError

    @classmethod
    def held_coordinators(cls, job_ids: list[str]) -> set[str]:
        """The jobs among ``job_ids`` whose coordinator message is queued or held by a live worker."""
        raise NotImplementedError

    # -- fair share ------------------------------------------------------------------
    def _take_outbox(self) -> list[tuple[Shipment, Future[dict[str, Any]]]]:
        """What to send now: the outbox, or as much of it as this job's fair share allows."""
        if not self._fair_ready:
            self._fair_ready = True

            client = self._fair_client() if get_settings().fair_share else None
            if client is not None:
                self._fair = FairShare(client, self.concurrency, weight=self.priority)
        with self._lock:
            demand = len(self._outbox) + len(self._pending)
        cap = self._fair.cap(demand) if self._fair is not None else None
        with self._lock:
            if cap is None:
                batch, self._outbox = self._outbox, []
            else:
                room = max(0, cap - len(self._pending))
                batch, self._outbox = self._outbox[:room], self._outbox[room:]
        return batch

    # -- the loop --------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        """Tasks shipped whose outcome has not been collected yet."""
        with self._lock:
            return len(self._outbox) + len(self._pending)

    def _ship(self, task: str, body: str) -> Future[dict[str, Any]]:
        fut: Future[dict[str, Any]] = Future()
        shipment = Shipment(new_task_id(self.job_id, task), task, body, tracing.inject(), self._parent_task())
        with self._lock:
            if self._closed:
                raise ExecutorError(f"the {self.name} executor is closed")
            self._outbox.append((shipment, fut))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"dmipro-{self.name}-collector",
                                                daemon=True)
                self._thread.start()
        self._wake.set()
        return fut

    def _run(self) -> None:
        interval = self.poll_min_s
        failing_since: float | None = None
        while True:
            with self._lock:
                idle = not self._outbox and not self._pending
            self._wake.wait(None if idle else interval)
            self._wake.clear()
            with self._lock:
                if self._closed:
                    return
            sent = self._send_batch(self._take_outbox())
            with self._lock:
                items = list(self._pending.items())
            cancelled = [tid for tid, (_, fut) in items if fut.cancelled()]
            if cancelled:
                self._drop(cancelled)
            ids = [tid for tid, (_, fut) in items if not fut.cancelled()]
            if ids and self._stop_cancelled_job(ids):
                continue
            if not ids:
                interval = self.poll_min_s
                continue
            try:
                outcomes = self._fetch(ids)
            except Exception as exc:  # a broker hiccup: keep the tasks, try again, give up eventually
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since > self.broker_failure_s:
                    self._fail_all(ExecutorError(f"the {self.name} result store has been unreachable for "
                                                 f"{self.broker_failure_s:.0f}s: {exc}"))
                    failing_since = None
                else:
                    log.warning("polling %s results failed (%s); retrying", self.name, exc)
                interval = min(max(interval * 2, 0.5), 5.0)
                continue
            failing_since = None
            for tid, outcome in outcomes.items():
                self._started.pop(tid, None)
                with self._lock:
                    entry = self._pending.pop(tid, None)
                if entry is not None:
                    _complete(entry[1], outcome)
            self._expire([tid for tid in ids if tid not in outcomes])
            interval = self.poll_min_s if outcomes or sent else min(interval * 1.5, self.poll_interval)

    def _send_batch(self, batch: list[tuple[Shipment, Future[dict[str, Any]]]]) -> bool:
        live = [(s, f) for s, f in batch if not f.cancelled()]
        if not live:
            return False
        try:
            self._send([s for s, _ in live])
        except Exception as exc:
            error = exc if isinstance(exc, DmiproError) else ExecutorError(
                f"cannot send tasks to the {self.name} broker: {type(exc).__name__}: {exc}")
            for _, fut in live:
                _complete(fut, Outcome(error=error))
            return False
        with self._lock:
            self._pending.update({s.id: (s, f) for s, f in live})
        return True

    def _stop_cancelled_job(self, ids: list[str]) -> bool:
        """Fail and revoke every task in flight once the watched job is cancelled; True if it was."""
        now = time.monotonic()
        if self._cancelled is None or now < self._next_cancel_check:
            return False
        self._next_cancel_check = now + 1.0
        if self._cancel_seen is None:
            try:
                if not self._cancelled():
                    return False
            except Exception as exc:  # the job database away for a moment: look again next second
                log.warning("checking the job's cancel flag failed: %s", exc)
                return False
            self._cancel_seen = now
        if now - self._cancel_seen < self.cancel_grace_s:
            return False
        log.info("the job was cancelled: revoking %d %s task(s) in flight", len(ids), self.name)
        self._abort(ids, lambda task: TaskError(f"task {task} was revoked: the job was cancelled", task=task,
                                                error_type="JobCancelled"))
        return True

    def _expire(self, ids: list[str]) -> None:
        if not self.deadlines:
            return
        now = time.monotonic()
        with self._lock:
            tasks = {tid: self._pending[tid][0].task for tid in ids if tid in self._pending}
        late = []
        for tid, task in tasks.items():
            limit, started = self.deadline_for(task), self._started.get(tid)
            if limit is not None and started is not None and now - started > limit:
                late.append(tid)
        if late:
            log.error("%d %s task(s) ran past their deadline; revoking them", len(late), self.name)
            self._abort(late, lambda task: TaskError(
                f"task {task} ran past its deadline of {self.deadline_for(task):.0f}s (sized from the job's "
                "LM deadline) and was revoked", task=task, error_type="TaskDeadlineExceeded"))

    def _abort(self, ids: list[str], error: Callable[[str], DmiproError]) -> None:
        with self._lock:
            entries = [(tid, self._pending.pop(tid)) for tid in ids if tid in self._pending]
        for tid, _ in entries:
            self._started.pop(tid, None)
        try:
            self._revoke([tid for tid, _ in entries], terminate=True)
        except Exception as exc:
            log.warning("revoking %d %s tasks failed: %s", len(entries), self.name, exc)
        for _, (shipment, fut) in entries:
            _complete(fut, Outcome(error=error(shipment.task)))

    def _drop(self, ids: list[str]) -> None:
        with self._lock:
            for tid in ids:
                self._pending.pop(tid, None)
        try:
            self._revoke(ids)
        except Exception as exc:
            log.warning("revoking %d %s tasks failed: %s", len(ids), self.name, exc)

    def _fail_all(self, error: DmiproError) -> None:
        with self._lock:
            entries = list(self._pending.values()) + list(self._outbox)
            self._pending.clear()
            self._outbox.clear()
        for _, fut in entries:
            _complete(fut, Outcome(error=error))

    def close(self) -> None:
        """Stop the collector; tasks still in flight are revoked and their futures fail."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            leftover = list(self._pending) + [s.id for s, _ in self._outbox]
        self._wake.set()
        if thread is not None:
            thread.join(timeout=30)
        if leftover:
            try:
                self._revoke(leftover)
            except Exception as exc:
                log.warning("revoking %d %s tasks at close failed: %s", len(leftover), self.name, exc)
        self._fail_all(ExecutorError(f"the {self.name} executor was closed before the task finished"))
        if self._fair is not None:
            self._fair.leave()


def _complete(fut: Future[dict[str, Any]], outcome: Outcome) -> None:
    try:
        if outcome.error is not None:
            fut.set_exception(outcome.error)
        else:
            fut.set_result(outcome.result or {})
    except InvalidStateError:  # cancelled by the caller meanwhile
        pass
