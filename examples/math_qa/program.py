"""The math_qa program: ``dspy.ChainOfThought`` over arithmetic word problems, and its metric."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import dspy

__all__ = ["MathQA", "build", "dev", "exact_match", "parse_number", "train"]

_DATA = Path(__file__).resolve().parent / "data"


class MathQA(dspy.Signature):
    """Answer the arithmetic word problem."""

    question: str = dspy.InputField()
    answer: str = dspy.OutputField()


def build() -> dspy.Module:
    """A fresh, unoptimized program: chain-of-thought over :class:`MathQA`."""
    return dspy.ChainOfThought(MathQA)


_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?|-?\.\d+")


def parse_number(text: Any) -> float | None:
    """The last number in ``text`` ("$1,000", "42 apples", "The answer is 42.") or ``None``."""
    if isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        return float(text)
    found = _NUMBER.findall(str(text))
    if not found:
        return None
    return float(found[-1].replace(",", ""))


def exact_match(example: Any, prediction: Any, trace: Any = None) -> float:
    """1.0 when the predicted answer is the expected number, else 0.0.

    Tolerant of formatting: "42.", "$42", "42 apples", "1,000" and "The answer is 42" all
    match 42. Answers that contain no number are compared as case-folded text.
    """
    expected = example["answer"] if not hasattr(example, "answer") else example.answer
    predicted = getattr(prediction, "answer", None)
    if predicted is None and isinstance(prediction, dict):
        predicted = prediction.get("answer")
    if predicted is None:
        return 0.0
    want, got = parse_number(expected), parse_number(predicted)
    if want is not None:
        return 1.0 if got is not None and abs(want - got) < 1e-9 else 0.0
    def norm(text: Any) -> str:
        return str(text).strip().strip(".").casefold()

    return 1.0 if norm(predicted) == norm(expected) else 0.0


def _split(name: str) -> list[dict[str, Any]]:
    lines = (_DATA / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def train() -> list[dict[str, Any]]:
    """The shipped training split, for jobs elsewhere (``trainset: examples.math_qa.program:train``)."""
    return _split("train")


def dev() -> list[dict[str, Any]]:
    """The shipped dev split (``valset: examples.math_qa.program:dev``)."""
    return _split("dev")
