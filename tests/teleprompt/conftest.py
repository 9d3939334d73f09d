"""Small MIPROv2 jobs on the math_qa data and the simulated LM, sized for tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

DATA = Path(__file__).resolve().parents[2] / "examples" / "math_qa" / "data"


def records(split: str, n: int) -> list[dict[str, Any]]:
    lines = (DATA / f"{split}.jsonl").read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


def small_spec(
    *, train: int = 30, val: int = 40, lm: dict[str, Any] | None = None, **optimizer: Any
) -> dict[str, Any]:
    """A job dict: ChainOfThought math_qa, explicit small counts unless ``optimizer`` says otherwise."""
    opt = {"auto": None, "num_candidates": 4, "num_trials": 6, "minibatch_size": 10, "seed": 3}
    opt.update(optimizer)
    return {
        "name": "small",
        "program": "examples.math_qa.program:build",
        "metric": "examples.math_qa.program:exact_match",
        "trainset": records("train", train),
        "valset": records("dev", val),
        "input_keys": ["question"],
        "lm": lm or {"model": "sim/math", "temperature": 0.0},
        "prompt_lm": {"model": "sim/math", "temperature": 1.0},
        "optimizer": opt,
        "executor": {"backend": "thread", "concurrency": 8},
    }


@pytest.fixture
def spec_factory() -> Any:
    return small_spec
