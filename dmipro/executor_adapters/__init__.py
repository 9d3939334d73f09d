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


def make_executor(backend: str, concurrency: int = 16) -> ExecutorAdapter:
    """Build the executor named ``backend`` with ``concurrency`` slots."""
    if backend == "inline":
        return InlineExecutor()
    if backend == "thread":
        return ThreadExecutor(concurrency)
    if backend == "celery":
        from dmipro.executor_adapters.celery import CeleryExecutor

        return CeleryExecutor(concurrency)
    if backend == "rq":
        from dmipro.executor_adapters.rq import RQExecutor

        return RQExecutor(concurrency)
    raise ConfigError(f"unknown executor backend {backend!r}; choose one of {', '.join(BACKENDS)}")
