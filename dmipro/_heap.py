"""The long-lived part of a process's heap, kept out of the cyclic garbage collector.

A process that runs jobs holds hundreds of thousands of objects for as long as it lives:
modules, classes and functions of DSPy, LiteLLM, optuna and SQLAlchemy, and their
registries. CPython's full collection walks every one of them, and it runs more often as
a job allocates: each walk held the GIL for 0.1-0.3 s, stopping every thread that was
waiting on the LM or shipping the next task. :func:`freeze_loaded` moves what is alive
once those libraries are loaded into the collector's permanent generation (``gc.freeze``),
once per process. Objects created later are collected as before; only cyclic garbage
among the frozen objects, which outlive the jobs anyway, is never reclaimed. A prefork
worker's children inherit the frozen heap and leave its pages shared.
"""

from __future__ import annotations

import gc
import threading

__all__ = ["freeze_loaded"]

_lock = threading.Lock()
_frozen = False


def freeze_loaded() -> bool:
    """Freeze the heap once the libraries every job uses are loaded; True the first time."""
    global _frozen
    with _lock:
        if _frozen:
            return False
        _frozen = True
        import optuna.samplers  # noqa: F401 -- every search loads it; load it before the freeze

        gc.freeze()
        return True
