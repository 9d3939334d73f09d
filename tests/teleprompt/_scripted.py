"""Simulated LMs that record each call, and small scenarios run by both MIPROv2s.

A recorded call notes the DSPy adapter in force when it reached the LM, under the LM's
``tag``; the tag survives ``deepcopy`` and ``lm.copy()``, as the engine is shared.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

import dspy

from dmipro.lm._sim import AsyncSimEngine, SimEngine
from examples.math_qa.program import MathQA, exact_match
from tests.fixtures.jobs import records

CALLS: dict[str, list[str | None]] = defaultdict(list)
TEACHER_CALLS: dict[str, int] = defaultdict(int)
_lock = threading.Lock()


class RecordingEngine(SimEngine):
    """The simulator, noting each call's adapter (by class name) under ``tag``."""

    def __init__(self, task: str = "math", *, tag: str = "lm", **options: Any) -> None:
        super().__init__(task, **options)
        self.tag = tag

    def complete(self, request: Any) -> Any:
        adapter = dspy.settings.adapter
        with _lock:
            CALLS[self.tag].append(None if adapter is None else type(adapter).__name__)
        return super().complete(request)


def recording_lm(tag: str, temperature: float = 0.0) -> dspy.LM:
    """A ``dspy.LM`` on the simulator whose calls are counted in ``CALLS[tag]``."""
    CALLS.pop(tag, None)
    engine = RecordingEngine(tag=tag)
    return dspy.LM(
        "sim/math", engine=engine, async_engine=AsyncSimEngine(engine), cache=False, temperature=temperature
    )


class CountingTeacher(dspy.ChainOfThought):  # type: ignore[misc]
    """A teacher with the student's structure that counts its own runs under ``tag``."""

    def __init__(self, tag: str) -> None:
        super().__init__(MathQA)
        self.tag = tag

    def forward(self, **kwargs: Any) -> Any:
        with _lock:
            TEACHER_CALLS[self.tag] += 1
        return super().forward(**kwargs)


class Gold:
    """A label object that is not JSON: the metric asks it whether an answer matches."""

    def __init__(self, answer: str) -> None:
        self.answer = answer

    def matches(self, predicted: Any) -> bool:
        return exact_match(dspy.Example(answer=self.answer), dspy.Prediction(answer=predicted)) == 1.0


def examples(split: str, n: int, *, gold: bool = False) -> list[dspy.Example]:
    """``n`` math_qa examples; with ``gold`` each also carries a :class:`Gold` label object."""
    out = []
    for r in records(split, n):
        if gold:
            r["gold"] = Gold(r["answer"])
        out.append(dspy.Example(**r).with_inputs("question"))
    return out
