"""``evaluate_chunk``: score one candidate on a few examples."""

from __future__ import annotations

import logging
from typing import Any

from dmipro.events import correlate
from dmipro.jobs.runtime import get_runtime
from dmipro.lm.usage import metered
from dmipro.tasks._registry import task

__all__ = ["evaluate_chunk", "score_example"]

log = logging.getLogger(__name__)


def score_example(runtime: Any, program: Any, example: Any, failure_score: float) -> tuple[float, str | None]:
    """Run ``program`` on one example and score it; an exception scores ``failure_score``."""
    try:
        prediction = program(**example.inputs())
        return float(runtime.metric(example, prediction)), None
    except Exception as exc:
        import dspy

        if dspy.settings.provide_traceback:  # as dspy.Evaluate(provide_traceback=True) reports it
            log.error("error on example %s", dict(example.inputs()), exc_info=True)
        return failure_score, f"{type(exc).__name__}: {exc}"[:500]


@task("evaluate_chunk")
def evaluate_chunk(payload: dict[str, Any]) -> dict[str, Any]:
    """Payload: ``job``, ``split``, ``example_ids`` (indices), ``candidate`` (or null), ``failure_score``.

    Returns ``{"results": [{"id", "score", "error"}], "usage": {...}}``.
    """
    runtime = get_runtime(payload["job"])
    examples = runtime.split(payload.get("split", "val"))
    program = runtime.program_for(payload.get("candidate"))
    failure = float(payload.get("failure_score", 0.0))
    results = []
    with (
        correlate(job_id=runtime.job_id, trial=payload.get("trial")),
        metered() as meter,
        runtime.context(lm=runtime.task_lm, trace=None),
    ):
        for idx in payload["example_ids"]:
            score, error = score_example(runtime, program, examples[idx], failure)
            results.append({"id": idx, "score": score, "error": error})
    return {"results": results, "usage": meter.usage.to_json()}
