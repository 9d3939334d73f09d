"""Runs each task in the caller, at submit time: for debugging and deterministic tests."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from dmipro.executor_adapters.base import ExecutorAdapter
from dmipro.executor_adapters.task_table import execute

__all__ = ["InlineAdapter"]


class InlineAdapter(ExecutorAdapter):
    """Runs tasks one at a time in the calling thread. Capacity 1."""

    name = "inline"

    def __init__(self, concurrency: int = 1) -> None:
        super().__init__(1)

    def _ship(self, task: str, body: str) -> Future[dict[str, Any]]:
        fut: Future[dict[str, Any]] = Future()
        try:
            fut.set_result(execute(task, body))
        except Exception as exc:
            fut.set_exception(exc)
        return fut
