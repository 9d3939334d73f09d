"""Offline comparison: two registered versions on the same examples, with a paired test.

Both versions are scored on one split of a job through the usual evaluation machinery
(the :class:`~dmipro.evaluation.Evaluator`: chunks fanned out over the job's executor, or
the one given, both versions in one fan-out), by
applying each version's instructions and demos to the job's program. Examples are
paired by id; an example that raised under either version is left out and counted.
Binary metrics get McNemar's exact test, continuous ones a paired t-test; the interval
of the difference is a paired bootstrap. Scores and differences are in points (0-100),
as everywhere in dmipro.
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np

from dmipro.ab import stats
from dmipro.config import get_settings
from dmipro.errors import ExperimentError
from dmipro.events import bus
from dmipro.registry.registry import Registry

__all__ = ["compare"]


def _candidate(registry: Registry, spec: str, predictors: set[str]) -> tuple[str, Any]:
    # Deferred like compare's imports (see there).
    from dmipro.jobs.candidate import candidate_of

    info = registry.show(spec)
    program = registry.load(info.spec)
    candidate = candidate_of(program)
    if set(candidate) != predictors:
        raise ExperimentError(
            f"{info.spec} has predictors {sorted(candidate)} but the job's program has {sorted(predictors)}; "
            "compare versions of the program the job runs"
        )
    return info.spec, candidate


def compare(
    a: str,
    b: str,
    job: Any,
    *,
    split: str = "test",
    executor: Any = None,
    concurrency: int | None = None,
    alpha: float = 0.05,
    url: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Score versions ``a`` and ``b`` (``NAME@V``, or ``NAME`` for the deployed one) on ``job``'s ``split``.

    Returns ``{"a": {"version", "score"}, "b": {...}, "diff", "ci_low", "ci_high",
    "p_value", "n", "better"}`` (``diff`` is b minus a in points; ``better`` is ``"a"``,
    ``"b"`` or None when the difference is not significant at ``alpha``), plus ``test``,
    ``split``, ``errors`` and the discordant counts of a binary metric. Emits
    ``dspy.langfuse.comparison_logged``.
    """
    # Deferred: dmipro.ab (loaded by every CLI start and by apps serving an experiment) must not
    # load DSPy and the evaluation stack (~1 s) for the one function that runs them.
    from dmipro.evaluation import EvalRequest, Evaluator
    from dmipro.executor_adapters import ExecutorAdapter, make_executor
    from dmipro.jobs import Job, JobStore, forget_runtime, load_job, register_runtime
    from dmipro.jobs._load import instantiate

    loaded = job if isinstance(job, Job) else load_job(job)
    spec = loaded.spec
    predictors = {name for name, _ in instantiate(spec.program).named_predictors()}
    registry = Registry(url or get_settings().effective_database_url)
    spec_a, cand_a = _candidate(registry, a, predictors)
    spec_b, cand_b = _candidate(registry, b, predictors)
    owned = not isinstance(executor, ExecutorAdapter)
    ex = executor if isinstance(executor, ExecutorAdapter) else make_executor(
        executor or spec.executor.backend, concurrency or spec.executor.concurrency)
    job_id = f"{spec.name}-offline-{uuid.uuid4().hex[:8]}"
    try:
        if ex.remote:  # remote workers load the job from its row
            job_id = JobStore().create(name=spec.name, spec=loaded.to_json(), executor=ex.name).id
        runtime = register_runtime(job_id, spec)
        evaluator = Evaluator(job_id, ex, split=split, size=len(runtime.split(split)),
                              chunk_size=spec.executor.chunk_size)
        # One fan-out for both versions: they share the executor's slots and finish together.
        res_a, res_b = evaluator.evaluate_many([EvalRequest(cand_a), EvalRequest(cand_b)])
    finally:
        forget_runtime(job_id)
        if owned:
            ex.close()
    by_id_b = {r.id: r for r in res_b.results}
    pairs = [(r.score, by_id_b[r.id].score) for r in res_a.results
             if r.id in by_id_b and r.error is None and by_id_b[r.id].error is None]
    errors = len(res_a.results) + len(res_b.results) - 2 * len(pairs)
    if len(pairs) < 2:
        raise ExperimentError(f"only {len(pairs)} examples scored under both versions; nothing to compare")
    xa = np.array([p[0] for p in pairs], dtype=np.float64)
    xb = np.array([p[1] for p in pairs], dtype=np.float64)
    binary = bool(np.isin(np.concatenate([xa, xb]), (0.0, 1.0)).all())
    out: dict[str, Any] = {}
    if binary:
        test = stats.mcnemar(xa, xb)
        p_value = test["p_value"]
        out["discordant"] = {"a_only": test["a_only"], "b_only": test["b_only"]}
    else:
        p_value = stats.paired_ttest(xa, xb)
    low, high = stats.paired_bootstrap_ci(xa, xb, alpha=alpha, seed=seed)
    diff = float((xb - xa).mean())
    better = None
    if p_value <= alpha and diff != 0:
        better = "b" if diff > 0 else "a"
    result = {
        "a": {"version": spec_a, "score": round(100.0 * float(xa.mean()), 2)},
        "b": {"version": spec_b, "score": round(100.0 * float(xb.mean()), 2)},
        "diff": round(100.0 * diff, 2),
        "ci_low": round(100.0 * low, 2),
        "ci_high": round(100.0 * high, 2),
        "p_value": p_value,
        "n": len(pairs),
        "better": better,
        "test": "mcnemar" if binary else "paired_t",
        "split": split,
        "errors": errors,
        **out,
    }
    bus.emit("dspy.langfuse.comparison_logged", job=spec.name, **result)
    return result
