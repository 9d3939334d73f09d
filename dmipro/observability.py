"""Switching observability on: the entry points a process calls once at start.

    dmipro.observability.setup()          # CLI, API, coordinator process
    dmipro.observability.setup_worker()   # each worker process (Celery worker_process_init, RQ start)
    dmipro.observability.shutdown()       # flush; also run at interpreter exit

``setup`` enables the subscribers named in ``Settings.subscribers`` (``DMIPRO_SUBSCRIBERS``
or ``subscribers:`` in dmipro.yaml): ``otel``, ``langfuse``, ``newrelic``. It is
idempotent per process — a second call enables only names not yet enabled — and, with
no subscribers configured, does nothing but read the settings. An unknown name, or a
subscriber whose library is missing, is a :class:`~dmipro.errors.ConfigError` that
says what to fix. With ``otel`` on, Celery (when installed) is instrumented too.
``setup_worker`` is the same call, made by worker processes after the fork.

Observability never breaks a run: exporters are guarded, subscribers that raise are
logged and skipped, and API keys are scrubbed from everything exported.

Collecting spans from other processes (e.g. a Celery worker in a test): give the
worker ``DMIPRO_SUBSCRIBERS=otel``, ``DMIPRO_OTEL_EXPORT_FILE=/path/spans-{pid}.jsonl``
and ``OTEL_TRACES_EXPORTER=none`` (``OTEL_METRICS_EXPORTER=none`` too, if no collector
runs), then read the files with :func:`read_span_file`.
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from dmipro.config import Settings, get_settings
from dmipro.errors import ConfigError
from dmipro.subscribers import KNOWN_SUBSCRIBERS
from dmipro.subscribers._otel_sdk import read_span_file

__all__ = [
    "KNOWN_SUBSCRIBERS",
    "background_task",
    "enabled",
    "flush",
    "read_span_file",
    "setup",
    "setup_worker",
    "shutdown",
]

log = logging.getLogger(__name__)


class _Handle(Protocol):
    def force_flush(self) -> None: ...

    def close(self) -> None: ...


_lock = threading.RLock()
_handles: dict[str, _Handle | None] = {}
_atexit_registered = False


def _names(settings: Settings) -> tuple[str, ...]:
    names: list[str] = []
    for raw in settings.subscribers:
        name = raw.strip().lower()
        if name not in KNOWN_SUBSCRIBERS:
            raise ConfigError(
                f"unknown subscriber {raw!r} in DMIPRO_SUBSCRIBERS / subscribers:; "
                f"known subscribers: {', '.join(KNOWN_SUBSCRIBERS)}"
            )
        if name not in names:
            names.append(name)
    return tuple(names)


def _enable(name: str, settings: Settings, span_exporters: Sequence[Any],
            metric_readers: Sequence[Any]) -> Any:
    # why: a backend loads only when switched on (otel and newrelic bring DSPy's callbacks, langfuse
    # the registry), so the executors that import this module pay nothing for subscribers they lack.
    if name == "otel":
        from dmipro.subscribers import otel

        handle = otel.enable(capture_text=settings.capture_text, span_exporters=span_exporters,
                             metric_readers=metric_readers)
        try:
            handle.celery_instrumented = otel.instrument_celery()
        except Exception:
            handle.close()
            raise
        return handle
    if name == "langfuse":
        from dmipro.subscribers import langfuse  # why: see above

        return langfuse.enable(capture_text=settings.capture_text)
    from dmipro.subscribers import newrelic  # why: see above

    return newrelic.enable()


def setup(settings: Settings | None = None, *, span_exporters: Sequence[Any] = (),
          metric_readers: Sequence[Any] = ()) -> tuple[str, ...]:
    """Enable the configured subscribers in this process; returns the names now active.

    ``span_exporters`` and ``metric_readers`` (OpenTelemetry SDK objects) are added to
    the ``otel`` subscriber's own when it is switched on by this call, e.g. an in-memory
    exporter in tests. A subscriber that is configured but off for lack of credentials
    (Langfuse without keys) is not listed.
    """
    global _atexit_registered
    settings = settings or get_settings()
    names = _names(settings)
    if not names:
        return enabled()
    with _lock:
        added: list[str] = []
        try:
            for name in names:
                if name not in _handles:
                    _handles[name] = _enable(name, settings, span_exporters, metric_readers)
                    added.append(name)
        except BaseException:
            for name in reversed(added):  # all or nothing: undo what this call switched on
                handle = _handles.pop(name)
                if handle is not None:
                    handle.close()
            raise
        if not _atexit_registered:
            atexit.register(shutdown)
            _atexit_registered = True
    return enabled()


def setup_worker(settings: Settings | None = None) -> tuple[str, ...]:
    """:func:`setup` for a worker process; call it after the fork.

    That is Celery's ``worker_process_init`` (prefork and solo pools both send it) and
    the start of an RQ worker. With ``otel`` on, Celery is instrumented (as in every
    process where Celery is installed), so task publish and run spans join the trace.
    """
    return setup(settings)


def enabled() -> tuple[str, ...]:
    """The subscribers active in this process."""
    with _lock:
        return tuple(name for name, handle in _handles.items() if handle is not None)


def flush() -> None:
    """Export everything recorded so far (spans, metrics, Langfuse data); errors are logged."""
    with _lock:
        handles = [h for h in _handles.values() if h is not None]
    for handle in handles:
        try:
            handle.force_flush()
        except Exception:
            log.exception("flushing %r failed", handle)


def shutdown() -> None:
    """Flush and switch every subscriber off; :func:`setup` may be called again afterwards."""
    with _lock:
        handles = [h for h in reversed(_handles.values()) if h is not None]
        _handles.clear()
    for handle in handles:
        try:
            handle.close()
        except Exception:
            log.exception("shutting down %r failed", handle)


def background_task(name: str, group: str = "dmipro") -> AbstractContextManager[None]:
    """A New Relic background transaction around a unit of work; a no-op when the agent is off."""
    # why: the New Relic subscriber module brings DSPy's callbacks; loaded at the first task, not at import
    from dmipro.subscribers.newrelic import background_task as nr_background_task

    return nr_background_task(name, group)
