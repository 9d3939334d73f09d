"""Programs the storage and registry tests save, load and compare."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dspy

from dmipro.lm._sim import sim_lm
from examples.math_qa.program import MathQA, build

__all__ = [
    "INSTRUCTION",
    "QUESTIONS",
    "SHARED",
    "build_bare",
    "build_renamed",
    "build_two_step",
    "optimized",
    "predictions",
]

_DATA = Path(__file__).resolve().parents[2] / "examples" / "math_qa" / "data"
INSTRUCTION = "Think step by step, double-check each operation, and give the final answer as a single number."


def _rows(name: str, n: int) -> list[dict[str, Any]]:
    lines = (_DATA / name).read_text(encoding="utf-8").splitlines()[:n]
    return [json.loads(line) for line in lines]


QUESTIONS = [row["question"] for row in _rows("dev.jsonl", 6)]


def optimized(instruction: str = INSTRUCTION, n_demos: int = 3) -> dspy.Module:
    """math_qa with a changed instruction, one bootstrapped (reasoned) demo and labeled ones."""
    program = build()
    program.predict.signature = program.predict.signature.with_instructions(instruction)
    demos = []
    for i, row in enumerate(_rows("train.jsonl", n_demos)):
        if i == 0:
            demos.append(
                dspy.Example(
                    augmented=True,
                    question=row["question"],
                    reasoning="Work through each step in order.",
                    answer=row["answer"],
                )
            )
        else:
            demos.append(dspy.Example(question=row["question"], answer=row["answer"]))
    program.predict.demos = demos
    return program


def predictions(program: dspy.Module, questions: list[str] = QUESTIONS) -> list[dict[str, Any]]:
    """The program's outputs on ``questions`` under the simulated math LM."""
    with dspy.context(lm=sim_lm("sim/math")):
        return [program(question=q).toDict() for q in questions]


class Renamed(dspy.Signature):
    """Answer the arithmetic word problem."""

    question: str = dspy.InputField()
    final_answer: str = dspy.OutputField()


def build_renamed() -> dspy.Module:
    """math_qa after someone renamed its output field: same field count, other names."""
    return dspy.ChainOfThought(Renamed)


class TwoStep(dspy.Module):
    """Two predictors: a draft and a check."""

    def __init__(self) -> None:
        super().__init__()
        self.draft = dspy.ChainOfThought(MathQA)
        self.check = dspy.Predict("question, draft -> answer")

    def forward(self, question: str) -> dspy.Prediction:
        draft = self.draft(question=question).answer
        return self.check(question=question, draft=draft)


def build_two_step() -> dspy.Module:
    """A two-predictor program."""
    return TwoStep()


SHARED = build()
"""A module instance used as a program reference (it must never be changed by loading)."""


def build_bare() -> dspy.Module:
    """A bare ``dspy.Predict`` (DSPy saves its state flat, without a predictor name)."""
    return dspy.Predict(MathQA)
