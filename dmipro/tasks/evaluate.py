"""``evaluate_chunk``: score one candidate on a few examples."""

from __future__ import annotations

import logging
from typing import Any

from dmipro.errors import TransientLMError
from dmipro.events import correlate
from dmipro.executor_adapters.task_table import task
from dmipro.jobs.runtime import get_runtime
from dmipro.lm.faults import to_lm_error
from dmipro.lm.usage import metered

__all__ = ["evaluate_chunk", "score_example"]

log = logging.getLogger(__name__)


def score_example(runtime: Any, program: Any, example: Any, failure_score: float) -> tuple[float, str | None]:
    """Run ``program`` on one example and score it.

    An exception of the program or metric, or a reply the adapter could not parse, scores
    ``failure_score`` (as DSPy's ``Evaluate`` does). An LM call that failed is no answer
    at all: it raises, as a dmipro :class:`~dmipro.errors.LMError`.
    """
    try:
        prediction = program(**example.inputs())
        return float(runtime.metric(example, prediction)), None
    except Exception as exc:
        lm_error = to_lm_error(exc)
        if lm_error is not None:
            if lm_error is exc:
                raise
            raise lm_error from exc
        import dspy

        if dspy.settings.provide_traceback:  # as dspy.Evaluate(provide_traceback=True) reports it
            log.error("error on example %s", dict(example.inputs()), exc_info=True)
        return failure_score, f"{type(exc).__name__}: {exc}"[:500]


@task("evaluate_chunk")
def evaluate_chunk(payload: dict[str, Any]) -> dict[str, Any]:
    """Payload: ``job``, ``split``, ``example_ids`` (indices), ``candidate`` (or null), ``failure_score``.

    Returns ``{"errored", "failed", "results": [{"id", "score", "error", "lm_error"}], "usage": {...},
    "faults": {...}}``: ``errored`` counts the examples whose LM call failed, ``failed`` those the
    program or the metric failed on, first, so Flower's result column shows them.
    An example whose LM call still failed after retrying is ``lm_error: true`` with no
    score: the caller evaluates it again later. A permanent LM error (bad key, no quota)
    fails the task, and so the job.
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
            try:
                score, error = score_example(runtime, program, examples[idx], failure)
            except TransientLMError as exc:
                results.append({"id": idx, "score": None, "error": f"{type(exc).__name__}: {exc}"[:500],
                                "lm_error": True})
                continue
            results.append({"id": idx, "score": score, "error": error})
    errored = sum(1 for r in results if r.get("lm_error"))
    failed = sum(1 for r in results if r["error"] and not r.get("lm_error"))
    return {"errored": errored, "failed": failed, "results": results, "usage": meter.usage.to_json(),
            "faults": meter.faults.to_json()}
