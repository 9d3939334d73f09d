"""``MIPROv2(executor="celery").compile(ref)`` submits a job to real Celery workers and waits."""

from __future__ import annotations

from typing import Any

import dspy
import pytest

import dmipro
from dmipro.jobs import JobStore
from dmipro.lm._sim import sim_lm
from examples.math_qa.program import build, exact_match
from tests.teleprompt._scripted import examples


def _optimizer() -> dmipro.MIPROv2:
    return dmipro.MIPROv2(
        metric=exact_match,
        task_model=sim_lm("sim/math", temperature=0.0),
        prompt_model=sim_lm("sim/math", temperature=1.0),
        auto=None,
        num_candidates=3,
        max_bootstrapped_demos=2,
        max_labeled_demos=2,
        num_threads=4,
        executor="celery",
    )


@pytest.mark.integration
def test_compile_on_celery_submits_a_job_and_returns_the_program(celery_stack: Any) -> None:
    opt = _optimizer()
    program = opt.compile(
        "examples.math_qa.program:build",
        trainset=examples("train", 20),
        valset=examples("dev", 20),
        num_trials=4,
        minibatch_size=10,
    )
    assert isinstance(program, dspy.Module)
    job = JobStore().get(program.job_id)
    assert job.executor == "celery" and job.state.value == "succeeded"
    assert program.score == job.result["best_score"]  # type: ignore[index]
    best = job.result["best_candidate"]["predict"]  # type: ignore[index]
    assert program.predict.signature.instructions == best["instruction"]
    first = program.trial_logs[1]  # DSPy's keys, JSON only (no program objects cross back)
    assert first["full_eval_score"] == job.result["baseline_score"]  # type: ignore[index]
    assert first["total_eval_calls_so_far"] == 20
    assert any("mb_score" in e for e in program.trial_logs.values())
    # The factory itself goes the same way, to the same result (same settings and seed).
    again = opt.compile(
        build, trainset=examples("train", 20), valset=examples("dev", 20), num_trials=4, minibatch_size=10
    )
    assert again.predict.signature.instructions == best["instruction"]
