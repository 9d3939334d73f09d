"""Provider faults never change the optimized program: errored examples are not scores.

Before the LM boundary existed, ``lm.sim: {rate_limit_rate: 0.8}`` on the task LM
completed with a worse best (75 instead of 90 on this job) because a call that failed
was scored as a wrong answer.
"""

from __future__ import annotations

from typing import Any

import pytest

import dmipro
from dmipro.errors import EvaluationError
from dmipro.jobs import JobState, JobStore
from tests.fixtures.jobs import math_job

SIM_429 = {"rate_limit_rate": 0.8, "retry_after_s": 0.01}


def _spec(task_sim: dict[str, Any] | None = None, prompt_sim: dict[str, Any] | None = None,
          **extra: Any) -> dict[str, Any]:
    spec = math_job(40, optimizer={"auto": "light", "seed": 9, **extra.pop("optimizer", {})})
    spec["lm"] = {"model": "sim/math", "temperature": 0.0, **({"sim": task_sim} if task_sim else {}),
                  **extra.pop("lm", {})}
    spec["prompt_lm"] = {"model": "sim/math", "temperature": 1.0,
                         **({"sim": prompt_sim} if prompt_sim else {})}
    spec.update(extra)
    return spec


def test_80_percent_429s_on_both_lms_give_the_clean_runs_best(recorded_events: list[Any]) -> None:
    clean = dmipro.optimize(_spec())
    del recorded_events[:]
    faulty = dmipro.optimize(_spec(SIM_429, SIM_429))
    assert faulty.best_score == clean.best_score
    assert faulty.best_candidate == clean.best_candidate
    assert faulty.baseline_score == clean.baseline_score
    summary = faulty.summary()
    assert summary["lm_errors"] == 0
    assert summary["retries"] > 100 and summary["rate_limited"] > 100
    assert summary["rate_limited_wait_s"] > 0
    assert clean.summary()["retries"] == 0
    # the counts reach the job row, so `dmipro status` shows them
    status = dmipro.status(faulty.job_id)
    assert status["retries"] == summary["retries"] and status["lm_errors"] == 0
    assert status["rate_limited_wait_s"] == summary["rate_limited_wait_s"]
    # and the events: the run's totals, and each evaluation's own
    [complete] = [e for e in recorded_events if e.name == "dspy.optimization.complete"]
    assert complete.data["retries"] == summary["retries"] and complete.data["lm_errors"] == 0
    batches = [e for e in recorded_events if e.name == "dspy.evaluation.batch_complete"]
    assert batches and all("rate_limited_wait_s" in e.data for e in batches)
    assert sum(e.data["retries"] for e in batches) > 0


def test_examples_whose_calls_failed_are_evaluated_again_not_scored() -> None:
    clean = dmipro.evaluate(_spec(), executor="thread")
    # one attempt per call: a third of the calls fail and stay failed until a later round
    flaky = _spec({"timeout_rate": 0.3}, lm={"retry": {"max_attempts": 1}})
    result = dmipro.evaluate(flaky, executor="thread")
    assert result.score == clean.score
    assert [r.score for r in result.results] == [r.score for r in clean.results]
    assert result.faults.lm_errors > 0
    assert result.n == clean.n and result.errors == 0


def test_an_evaluation_that_cannot_be_completed_gives_no_score() -> None:
    # a provider that is down: the circuit breaker holds calls back until their deadline
    dead = _spec({"timeout_rate": 1.0}, lm={"retry": {"max_attempts": 1, "deadline_s": 2}})
    with pytest.raises(EvaluationError, match="incomplete"):
        dmipro.evaluate(dead, executor="thread")


def test_max_errors_applies_to_the_search() -> None:
    flaky = _spec({"timeout_rate": 0.5}, lm={"retry": {"max_attempts": 1, "deadline_s": 2}},
                  optimizer={"max_errors": 3})
    with pytest.raises(dmipro.DmiproError) as caught:
        dmipro.optimize(flaky)
    assert "LMTimeoutError" in str(caught.value) or "max_errors" in str(caught.value)
    [record] = JobStore().list(1)
    assert record.state == JobState.FAILED and record.error
    assert dmipro.status(record.id)["lm_errors"] > 0
