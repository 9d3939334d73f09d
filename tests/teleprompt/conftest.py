"""Small MIPROv2 jobs on the math_qa data and the simulated LM, sized for tests."""

from __future__ import annotations

from typing import Any

import pytest

from tests.fixtures.jobs import math_job, records


def small_spec(
    *, train: int = 30, val: int = 40, lm: dict[str, Any] | None = None, **optimizer: Any
) -> dict[str, Any]:
    """A job dict: ChainOfThought math_qa, explicit small counts unless ``optimizer`` says otherwise."""
    opt = {"auto": None, "num_candidates": 4, "num_trials": 6, "minibatch_size": 10, "seed": 3}
    opt.update(optimizer)
    return math_job(
        name="small",
        trainset=records("train", train),
        valset=records("dev", val),
        lm=lm or {"model": "sim/math", "temperature": 0.0},
        prompt_lm={"model": "sim/math", "temperature": 1.0},
        optimizer=opt,
        executor={"backend": "thread", "concurrency": 8},
    )


@pytest.fixture
def spec_factory() -> Any:
    return small_spec
