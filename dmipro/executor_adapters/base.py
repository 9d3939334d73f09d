"""The executor plug point: where tasks run.

MIPROv2's code never knows where its tasks run; it hands a task name and a JSON
payload to an :class:`ExecutorAdapter` and gets the JSON result back. The base class
owns the loop (``submit`` checks and encodes, ``map`` fans out and collects in
completion order); an adapter overrides one hook, ``_ship``, that sends one task and
returns a :class:`concurrent.futures.Future` of its result.

Contract for adapters:
- ``_ship`` must not block on the task; the future completes with the result dict or
  fails with :class:`~dmipro.errors.TaskError`.
- Adapters are used from one coordinating thread and ``_ship`` need not be
  re-entrant, unless the adapter sets ``concurrent_submit``: then several threads may
  submit at once. Futures may be completed from any thread.
- ``remote`` adapters run tasks in other processes, perhaps other machines: payloads
  must be self-contained and the job database must be reachable from there.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from functools import partial
from queue import SimpleQueue
from types import TracebackType
from typing import Any, ClassVar

from dmipro.errors import ExecutorError
from dmipro.executor_adapters.task_table import decode_payload, encode_payload, get_task
from dmipro.lm.faults import FaultCounts
from dmipro.lm.usage import Usage
from dmipro.tracing import inject

__all__ = ["ExecutorAdapter", "decode_payload", "encode_payload"]


def _report(finished: SimpleQueue[int], index: int, _: Future[Any]) -> None:
    finished.put(index)


class ExecutorAdapter:
    """Runs named tasks on JSON payloads, somewhere; see the module docstring for the contract."""

    name: ClassVar[str] = "base"
    remote: ClassVar[bool] = False
    concurrent_submit: ClassVar[bool] = False

    def __init__(self, concurrency: int = 1) -> None:
        if concurrency < 1:
            raise ExecutorError(f"concurrency must be at least 1, got {concurrency}")
        self.concurrency = concurrency

    @property
    def capacity(self) -> int:
        """How many tasks can make progress at once."""
        return self.concurrency

    def submit(self, task: str, payload: dict[str, Any]) -> Future[dict[str, Any]]:
        """Ship one task; the future resolves to its JSON result."""
        return self._ship(task, self._encode(task, [payload])[0])

    def _encode(self, task: str, payloads: Iterable[dict[str, Any]]) -> list[str]:
        """Check the task name and encode every payload, before anything is shipped."""
        get_task(task)  # an unknown name fails here, in the caller, not on a worker
        carrier = inject()
        return [encode_payload({**p, "_trace": carrier} if carrier else p) for p in payloads]

    def map(self, task: str, payloads: Iterable[dict[str, Any]]) -> Iterator[tuple[int, dict[str, Any]]]:
        """Run ``task`` on every payload; yield ``(index, result)`` as each one completes.

        The first failed task raises its error; tasks not yet finished are cancelled
        where the executor can cancel them.
        """
        bodies = self._encode(task, payloads)  # a bad payload fails before any task is shipped
        # Each future reports itself on a queue as it completes: one wakeup per task, where
        # waiting on the whole pending set again after each one costs O(n) per completion.
        finished: SimpleQueue[int] = SimpleQueue()
        futures: list[Future[dict[str, Any]]] = []
        for i, body in enumerate(bodies):
            fut = self._ship(task, body)
            futures.append(fut)
            fut.add_done_callback(partial(_report, finished, i))
        try:
            for _ in futures:
                index = finished.get()
                yield index, futures[index].result()
        finally:
            for fut in futures:
                fut.cancel()  # no-op on the finished ones

    def gather(
        self, task: str, payloads: list[dict[str, Any]], usage: Usage, faults: FaultCounts | None = None
    ) -> list[dict[str, Any]]:
        """Run ``task`` on every payload; the results in payload order, their LM usage (and fault
        counts) added to ``usage`` (and ``faults``) as each one arrives."""
        results: list[dict[str, Any]] = [{} for _ in payloads]
        for i, res in self.map(task, payloads):
            usage.add(Usage.from_json(res.get("usage")))
            if faults is not None:
                faults.add(FaultCounts.from_json(res.get("faults")))
            results[i] = res
        return results

    def _ship(self, task: str, body: str) -> Future[dict[str, Any]]:
        """Send one encoded task; return a future of its decoded result."""
        raise NotImplementedError

    def close(self) -> None:
        """Release threads and connections."""

    def __enter__(self) -> ExecutorAdapter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
