"""The event bus: named events with correlation ids, delivered to subscribers.

One bus per process (:data:`bus`). ``emit()`` builds one :class:`Event` per occurrence
and hands it to every matching subscriber once, in subscription order. Each event
carries the job id and trial number of the context it was emitted in
(:func:`correlate`) and, when OpenTelemetry is active, the current trace and span ids,
so events from a coordinator and its workers read as one run.

A subscriber that raises is logged and skipped; it never breaks the run that emitted
the event. Subscribe with a glob pattern (``dspy.optimization.*``) and a callable, or
register a :class:`Subscriber` (a no-op hook class: override what you need).
"""

from __future__ import annotations

import fnmatch
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "EVENT_NAMES",
    "Event",
    "EventBus",
    "Subscriber",
    "bus",
    "correlate",
    "current_job_id",
    "current_trial",
]

log = logging.getLogger(__name__)

EVENT_NAMES: frozenset[str] = frozenset(
    {
        "dspy.evaluation.start",
        "dspy.evaluation.batch_complete",
        "dspy.optimization.start",
        "dspy.optimization.complete",
        "dspy.optimization.error",
        "dspy.optimization.trial_start",
        "dspy.optimization.trial_complete",
        "dspy.optimization.bootstrap_complete",
        "dspy.optimization.instruction_proposal_complete",
        "dspy.optimization.requeued",
        "dspy.signature.optimized",
        "dspy.signature.deployed",
        "dspy.storage.save",
        "dspy.storage.load",
        "dspy.storage.error",
        "dspy.registry.register",
        "dspy.registry.rollback",
        "dspy.ab.assign",
        "dspy.ab.outcome",
        "dspy.ab.decision",
        "dspy.ab.regression",
        "dspy.langfuse.comparison_logged",
    }
)
"""Every event name dmipro emits; ``emit`` refuses others so a typo cannot go unnoticed."""

_job_id: ContextVar[str | None] = ContextVar("dmipro_job_id", default=None)
_trial: ContextVar[int | None] = ContextVar("dmipro_trial", default=None)


def current_job_id() -> str | None:
    """The job id of the current context, if any."""
    return _job_id.get()


def current_trial() -> int | None:
    """The trial number of the current context, if any."""
    return _trial.get()


@contextmanager
def correlate(*, job_id: str | None = None, trial: int | None = None) -> Iterator[None]:
    """Attach ``job_id`` and/or ``trial`` to every event emitted inside the block."""
    tokens: list[tuple[ContextVar[Any], Any]] = []
    if job_id is not None:
        tokens.append((_job_id, _job_id.set(job_id)))
    if trial is not None:
        tokens.append((_trial, _trial.set(trial)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def _trace_ids() -> tuple[str | None, str | None]:
    try:
        from opentelemetry import trace
    except ImportError:
        return None, None
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None, None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


@dataclass(frozen=True)
class Event:
    """One occurrence: its name, its data, and the ids that place it in a run."""

    name: str
    data: Mapping[str, Any]
    job_id: str | None = None
    trial: int | None = None
    trace_id: str | None = None
    span_id: str | None = None
    timestamp: float = field(default_factory=time.time)
    event_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of the event."""
        return {
            "name": self.name,
            "data": dict(self.data),
            "job_id": self.job_id,
            "trial": self.trial,
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "timestamp": self.timestamp,
            "event_id": self.event_id,
        }


class Subscriber:
    """Base for event subscribers: every hook is a no-op.

    ``patterns`` are globs matched against event names. ``on_event`` runs on the
    emitting thread, so it must be quick and thread-safe; slow exporters should queue.
    """

    patterns: tuple[str, ...] = ("*",)

    def on_event(self, event: Event) -> None:
        """Called once per matching event."""

    def close(self) -> None:
        """Flush and release resources; called when the subscriber is removed."""


class _Callback(Subscriber):
    def __init__(self, pattern: str, fn: Callable[[Event], None]) -> None:
        self.patterns = (pattern,)
        self.fn = fn

    def on_event(self, event: Event) -> None:
        self.fn(event)


class EventBus:
    """Dispatches events to subscribers. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: list[Subscriber] = []

    def add(self, subscriber: Subscriber) -> Subscriber:
        """Register a subscriber; returns it, for ``remove``."""
        with self._lock:
            self._subscribers.append(subscriber)
        return subscriber

    def subscribe(self, pattern: str, fn: Callable[[Event], None]) -> Subscriber:
        """Call ``fn(event)`` for every event whose name matches the glob ``pattern``."""
        return self.add(_Callback(pattern, fn))

    def remove(self, subscriber: Subscriber) -> None:
        """Unregister a subscriber and close it."""
        with self._lock:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)
        try:
            subscriber.close()
        except Exception:
            log.exception("closing subscriber %r failed", subscriber)

    @property
    def subscribers(self) -> tuple[Subscriber, ...]:
        with self._lock:
            return tuple(self._subscribers)

    def emit(self, name: str, /, **data: Any) -> Event:
        """Build one event from the current context and deliver it once to each match."""
        if name not in EVENT_NAMES:
            raise ValueError(f"unknown event name {name!r}")
        job_id = data.pop("job_id", None) or _job_id.get()
        trial = data.pop("trial") if "trial" in data else _trial.get()
        trace_id, span_id = _trace_ids()
        event = Event(name, data, job_id, trial, trace_id, span_id)
        for sub in self.subscribers:
            if not any(fnmatch.fnmatchcase(name, p) for p in sub.patterns):
                continue
            try:
                sub.on_event(event)
            except Exception:
                log.exception("subscriber %r failed on %s; the run goes on", sub, name)
        return event


bus = EventBus()
"""The process's event bus."""
