"""Buffered, batched outcome writes: one recorder per database per process.

``record()`` on the hot path only appends a row to an in-memory buffer. A daemon thread
writes the buffer in one multi-row INSERT every ``FLUSH_INTERVAL_S`` seconds, or sooner
when ``MAX_BATCH`` rows wait. A failed write keeps the rows and is retried on the next
round; failures are counted and logged, never swallowed. ``flush()`` writes now and
raises if it cannot; an ``atexit`` hook closes every recorder (a final flush, retried), so
a clean shutdown loses nothing. A forked child starts with an empty buffer: the rows
buffered before the fork belong to the parent, which writes them.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from sqlalchemy import insert

from dmipro.ab._models import OutcomeRow
from dmipro.db import session_scope
from dmipro.errors import ExperimentError

__all__ = ["FLUSH_INTERVAL_S", "MAX_BATCH", "MAX_BUFFER", "Recorder", "recorder_for"]

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 0.5
MAX_BATCH = 2000
MAX_BUFFER = 1_000_000
"""Rows a recorder holds while its database is unreachable; beyond it ``record`` raises."""
_EXIT_ATTEMPTS = 5


class Recorder:
    """Buffers outcome rows for one database URL and writes them in batches. Thread-safe."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._buffer: list[dict[str, Any]] = []
        self._thread: threading.Thread | None = None
        self._closed = False
        self._hooks: weakref.WeakSet[Any] = weakref.WeakSet()
        self.written = 0
        self.failed_writes = 0
        self.last_error: str | None = None

    @property
    def pending(self) -> int:
        """Rows recorded but not yet written."""
        with self._lock:
            return len(self._buffer)

    def add(self, row: dict[str, Any]) -> None:
        """Queue one outcome row (the hot path: an append under a lock)."""
        with self._lock:
            if len(self._buffer) >= MAX_BUFFER:
                raise ExperimentError(
                    f"{len(self._buffer)} outcomes wait for the database ({self.last_error}); "
                    "refusing more rather than losing them"
                )
            self._buffer.append(row)
            size = len(self._buffer)
            if self._thread is None or not self._thread.is_alive():
                self._start()
        if size >= MAX_BATCH:
            self._wake.set()

    def watch(self, obj: Any) -> None:
        """Call ``obj._background()`` from the writer thread each round (state refresh, kept weakly)."""
        self._hooks.add(obj)

    def _start(self) -> None:
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="dmipro-ab-recorder", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._closed:
            self._wake.wait(FLUSH_INTERVAL_S)
            self._wake.clear()
            try:
                self.flush()
            except Exception:
                pass  # counted and logged by flush; the rows stay buffered for the next round
            for hook in list(self._hooks):
                try:
                    hook._background()
                except Exception:
                    log.debug("A/B background refresh failed", exc_info=True)

    def flush(self) -> int:
        """Write every buffered row now; returns how many. Raises :class:`ExperimentError` on failure."""
        with self._flush_lock:
            written = 0
            while True:
                with self._lock:
                    rows = self._buffer[:MAX_BATCH]
                    del self._buffer[: len(rows)]
                if not rows:
                    return written
                try:
                    with session_scope(self.url) as s:
                        s.execute(insert(OutcomeRow), rows)
                except Exception as exc:
                    with self._lock:
                        self._buffer[:0] = rows  # back at the front, in order
                    self.failed_writes += 1
                    self.last_error = f"{type(exc).__name__}: {exc}"[:500]
                    log.warning("writing %d A/B outcomes failed (%s); they stay buffered", len(rows),
                                self.last_error)
                    raise ExperimentError(f"could not write {len(rows)} outcomes: {self.last_error}") from exc
                written += len(rows)
                self.written += len(rows)

    def close(self, attempts: int = 1) -> None:
        """Stop the writer thread and write what is left (``attempts`` tries, a second apart)."""
        self._closed = True
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)
        for attempt in range(attempts):
            try:
                self.flush()
                return
            except ExperimentError:
                if attempt == attempts - 1:
                    raise
                time.sleep(1.0)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._buffer = []
        self._thread = None
        self._closed = False


_lock = threading.Lock()
_recorders: dict[str, Recorder] = {}


def recorder_for(url: str) -> Recorder:
    """The process's recorder for database ``url``."""
    with _lock:
        rec = _recorders.get(url)
        if rec is None:
            rec = _recorders[url] = Recorder(url)
        return rec


def _close_all() -> None:
    for rec in list(_recorders.values()):
        try:
            rec.close(attempts=_EXIT_ATTEMPTS)
        except Exception as exc:
            # Visible on stderr at exit: these outcomes could not be stored.
            log.error("A/B outcomes lost at exit: %d rows for %s (%s)", rec.pending, rec.url, exc)


def _reset_after_fork() -> None:
    global _lock
    _lock = threading.Lock()
    for rec in _recorders.values():
        rec._after_fork()


atexit.register(_close_all)
_register_at_fork: Callable[..., None] | None = getattr(os, "register_at_fork", None)
if _register_at_fork is not None:
    _register_at_fork(after_in_child=_reset_after_fork)
