"""Progress counts finished evaluations: each trial is reported done when its evaluation ends."""

from __future__ import annotations

from typing import Any

from dmipro.api import optimize
from tests.fixtures.jobs import math_job


def test_trials_done_moves_one_trial_at_a_time_within_a_batch() -> None:
    seen: list[dict[str, Any]] = []
    job = math_job(
        n=20,
        optimizer={"auto": None, "num_candidates": 3, "num_trials": 8, "minibatch_size": 10, "seed": 4},
        executor={"backend": "thread", "concurrency": 8},
    )
    result = optimize(job, on_progress=seen.append)
    search = [p["trials_done"] for p in seen if p["phase"] == "search"]
    # Batches hold several trials (8 slots, 10 examples a trial, TPE's random start), yet every
    # count from 0 to the last is reported on its own: the bar never jumps a whole batch.
    assert max(search) == result.trials == 8
    assert sorted(set(search)) == list(range(0, 9))
    assert search == sorted(search)  # it never goes back
