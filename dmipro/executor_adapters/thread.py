"""A thread pool in this process: the embedded default (LM calls are I/O-bound)."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from dmipro.executor_adapters.base import ExecutorAdapter
from dmipro.executor_adapters.task_table import execute

__all__ = ["ThreadAdapter"]


class ThreadAdapter(ExecutorAdapter):
    """Runs tasks on ``concurrency`` threads; each task gets a fresh DSPy context."""

    name = "thread"
    concurrent_submit = True

    def __init__(self, concurrency: int = 16) -> None:
        super().__init__(concurrency)
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="dmipro-task")

    def _ship(self, task: str, body: str) -> Future[dict[str, Any]]:
        return self._pool.submit(execute, task, body)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
