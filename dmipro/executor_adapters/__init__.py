"""Executor adapters, the transport layer: inline, thread (built in), celery and rq (extras, loaded lazily).

Below the application: MIPROv2's code hands task names and JSON payloads to an
:class:`ExecutorAdapter`; the task table (:mod:`.task_table`) maps names to bodies;
each remote adapter module holds its broker's whole wire protocol, which the workers
(:mod:`dmipro.workers`) import — never the reverse.
"""

from __future__ import annotations

import importlib

from dmipro.errors import ConfigError
from dmipro.executor_adapters._remote import RemoteAdapter
from dmipro.executor_adapters.base import ExecutorAdapter, encode_payload
from dmipro.executor_adapters.inline import InlineAdapter
from dmipro.executor_adapters.thread import ThreadAdapter

__all__ = [
    "BACKENDS",
    "REMOTE_BACKENDS",
    "ExecutorAdapter",
    "InlineAdapter",
    "InlineExecutor",
    "RemoteAdapter",
    "ThreadAdapter",
    "ThreadExecutor",
    "encode_payload",
    "make_executor",
    "remote_adapter",
]

BACKENDS = ("inline", "thread", "celery", "rq")

REMOTE_BACKENDS = ("celery", "rq")
"""The backends whose tasks run on workers, each with its adapter module (loaded on first use)."""

_REMOTE_CLASSES = {"celery": "CeleryAdapter", "rq": "RQAdapter"}

# Earlier names of the built-in adapters, kept so code written against them runs unchanged.
InlineExecutor = InlineAdapter
ThreadExecutor = ThreadAdapter


def remote_adapter(backend: str) -> type[RemoteAdapter]:
    """The adapter class of remote ``backend`` (it also speaks the job's coordinator protocol)."""
    if backend not in _REMOTE_CLASSES:
        raise ConfigError(f"executor must be one of {', '.join(REMOTE_BACKENDS)}, got {backend!r}")
    # The extras load here, on first use: `import dmipro` needs neither Celery nor RQ.
    cls: type[RemoteAdapter] = getattr(importlib.import_module(f"dmipro.executor_adapters.{backend}"),
                                        _REMOTE_CLASSES[backend])
    return cls


def make_executor(backend: str, concurrency: int = 16, *, priority: float = 1.0) -> ExecutorAdapter:
    """Build the executor named ``backend`` with ``concurrency`` slots.

    ``priority`` is the job's weight in the fair share of a Celery or RQ fleet between
    the jobs running at once; local executors have the machine to themselves.
    """
    if backend == "inline":
        return InlineAdapter()
    if backend == "thread":
        return ThreadAdapter(concurrency)
    if backend in REMOTE_BACKENDS:
        return remote_adapter(backend)(concurrency, priority=priority)
    raise ConfigError(f"unknown executor backend {backend!r}; choose one of {', '.join(BACKENDS)}")
