"""Executor adapters: inline, thread (built in), celery and rq (extras, loaded lazily)."""

from __future__ import annotations

from dmipro.errors import ConfigError
from dmipro.executor_adapters.base import ExecutorAdapter, encode_payload
from dmipro.executor_adapters.inline import InlineExecutor
from dmipro.executor_adapters.thread import ThreadExecutor

__all__ = [
    "BACKENDS",
    "ExecutorAdapter",
    "InlineExecutor",
    "ThreadExecutor",
    "encode_payload",
    "make_executor",
]

BACKENDS = ("inline", "thread", "celery", "rq")


def make_executor(backend: str, concurrency: int = 16, *, priority: float = 1.0) -> ExecutorAdapter:
    """Build the executor named ``backend`` with ``concurrency`` slots.

    ``priority`` is the job's weight in the fair share of a Celery or RQ fleet between
    the jobs running at once; local executors have the machine to themselves.
    """
    if backend == "inline":
        return InlineExecutor()
    if backend == "thread":
        return ThreadExecutor(concurrency)
    if backend == "celery":
        from dmipro.executor_adapters.celery import CeleryExecutor

        return CeleryExecutor(concurrency, priority=priority)
    if backend == "rq":
        from dmipro.executor_adapters.rq import RQExecutor

        return RQExecutor(concurrency, priority=priority)
    raise ConfigError(f"unknown executor backend {backend!r}; choose one of {', '.join(BACKENDS)}")
