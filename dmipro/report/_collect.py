"""The numbers of a run report, gathered from the job database and the job's Optuna studies.

:func:`collect` works for a running, failed or finished job: the trials come from the
study, per-phase usage from the job's result or, before it ends, from its phase
checkpoints. scikit-learn (the ``bench`` extra) is needed only for the importances.
"""

from __future__ import annotations

import math
import time
from typing import Any

from dmipro._imports import guarded
from dmipro.errors import ConfigError, JobNotFoundError
from dmipro.jobs.store import JobStore
from dmipro.teleprompt.search import full_study_name, trial_kind

__all__ = ["MIN_IMPORTANCE_TRIALS", "PHASES", "collect", "fmt_cost"]

MIN_IMPORTANCE_TRIALS = 8
"""Below this many scored search trials, importances are noise (fANOVA says 50/50 on one trial)."""

PHASES = ("bootstrap", "propose", "search")


# -- the numbers ----------------------------------------------------------------------
def _study(name: str, url: str) -> Any | None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=name, storage=url)
    except KeyError:  # the job has not reached the search yet (or predates the companion)
        return None


def _param_label(name: str, predictors: list[str]) -> str:
    index, _, what = name.partition("_predictor_")
    predictor = predictors[int(index)] if index.isdigit() and int(index) < len(predictors) else index
    return f"{predictor}: {'instruction' if what == 'instruction' else 'demo set'}"


def _importance(trials: list[Any], predictors: list[str]) -> dict[str, Any]:
    """fANOVA importances (seed 0) over the search trials, or a note saying why there are none."""
    import optuna

    out: dict[str, Any] = {
        "evaluator": "fanova",
        "seed": 0,
        "trials": len(trials),
        "params": {},
        "note": None,
    }
    if len(trials) < MIN_IMPORTANCE_TRIALS:
        out["note"] = (
            f"{len(trials)} scored search trials: too few for importances (needs {MIN_IMPORTANCE_TRIALS}); "
            "the mean score per choice is shown instead"
        )
        return out
    if len({t.value for t in trials}) < 2:
        out["note"] = "every search trial scored the same: no choice made a difference"
        return out
    try:
        with guarded(extra="bench", purpose="importances (fANOVA's forest, scikit-learn)"):
            import sklearn  # noqa: F401
    except ConfigError as exc:  # the numbers are still worth having: the note says what is missing
        out["note"] = str(exc)
        return out
    memory = optuna.create_study(direction="maximize")
    memory.add_trials(trials)
    values = optuna.importance.get_param_importances(
        memory, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
    )
    out["params"] = {_param_label(k, predictors): round(float(v), 4) for k, v in values.items()}
    return out


def _choices(trials: list[Any], predictors: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Mean search score per value of each parameter: which instruction / demo set did well."""
    table: dict[str, dict[int, list[float]]] = {}
    for t in trials:
        for name, value in t.params.items():
            table.setdefault(name, {}).setdefault(int(value), []).append(float(t.value))
    return {
        _param_label(name, predictors): [
            {"choice": v, "mean_score": round(sum(s) / len(s), 2), "trials": len(s)}
            for v, s in sorted(by_value.items())
        ]
        for name, by_value in sorted(table.items())
    }


def _phase_numbers(stats: dict[str, Any]) -> dict[str, Any]:
    task, prompt = stats.get("task_lm", {}), stats.get("prompt_lm", {})
    cost_parts = [task.get("cost_usd"), prompt.get("cost_usd")]
    return {
        "task_lm_calls": int(task.get("calls", 0)),
        "prompt_lm_calls": int(prompt.get("calls", 0)),
        "lm_calls": int(task.get("calls", 0)) + int(prompt.get("calls", 0)),
        "tokens": int(task.get("tokens", 0)) + int(prompt.get("tokens", 0)),
        # An unknown price stays unknown: a model litellm cannot price is never counted as free.
        "cost_usd": None if any(c is None for c in cost_parts) else round(sum(cost_parts), 6),
        "wall_s": round(float(stats.get("wall_s", 0.0)), 3),
        "resumed": bool(stats.get("resumed", False)),
    }


def collect(job_id: str, store: JobStore | None = None) -> dict[str, Any]:
    """Every number the report shows for ``job_id`` (JSON-ready)."""
    store = store or JobStore()
    record = store.find(job_id)
    if record is None:
        raise JobNotFoundError(f"no job {job_id!r} in the job database")
    result = record.result or {}
    url = store.url
    study = _study(f"dmipro:{job_id}", url)
    started = record.started_at or record.created_at

    predictors: list[str] = list((result.get("best_candidate") or {}).keys())
    trials: list[dict[str, Any]] = []
    searched: list[Any] = []
    raw = [] if study is None else study.get_trials(deepcopy=False)
    if not predictors:
        predictors = sorted(
            {k.split(".", 1)[0] for t in raw for k in t.user_attrs if k.endswith(".instruction")}
        )
    for t in raw:
        if t.value is None:
            continue
        kind = trial_kind(t) or "minibatch"
        finished = t.datetime_complete.timestamp() if t.datetime_complete else None
        trials.append(
            {
                "trial": t.number + 1,
                "kind": kind,
                "score": float(t.value),
                "t_s": None if finished is None else round(finished - started, 3),
                "params": dict(t.params),
                **{k: v for k, v in t.user_attrs.items() if "." in k},
            }
        )
    full_kinds = ("baseline", "full")
    has_minibatch = any(t["kind"] == "minibatch" for t in trials)
    search_kind = "minibatch" if has_minibatch else "full"
    searched = [t for t in raw if t.value is not None and (trial_kind(t) or "minibatch") == search_kind]

    best_so_far: list[dict[str, Any]] = []
    best = -math.inf
    for t in sorted((t for t in trials if t["kind"] in full_kinds), key=lambda t: t["trial"]):
        if t["score"] > best:  # strict, as the coordinator: a tie keeps the earlier program
            best = t["score"]
            best_so_far.append({"trial": t["trial"], "t_s": t["t_s"], "score": t["score"]})

    phases: dict[str, Any] = {}
    for name in PHASES:
        stats = (result.get("phases") or {}).get(name)
        if stats is None:
            checkpoint = store.load_checkpoint(job_id, name)
            stats = None if checkpoint is None else checkpoint.get("stats")
        if stats is not None:
            phases[name] = _phase_numbers(stats)
    costs = [p["cost_usd"] for p in phases.values()]
    total = {
        "lm_calls": sum(p["lm_calls"] for p in phases.values()),
        "tokens": sum(p["tokens"] for p in phases.values()),
        "cost_usd": None if any(c is None for c in costs) else round(sum(costs), 6),
        "wall_s": round(float(result["wall_s"]), 3)
        if "wall_s" in result
        else round(sum(p["wall_s"] for p in phases.values()), 3),
    }
    baseline = next((t["score"] for t in trials if t["kind"] == "baseline"), result.get("baseline_score"))
    best_score = result.get("best_score", best_so_far[-1]["score"] if best_so_far else None)
    full_study = _study(full_study_name(f"dmipro:{job_id}"), url)
    return {
        "job_id": job_id,
        "name": record.name,
        "state": record.state.value,
        "phase": record.phase,
        "program": record.spec.get("program"),
        "lm": (record.spec.get("lm") or {}).get("model"),
        "created_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record.created_at)),
        "baseline_score": baseline,
        "best_score": best_score,
        "improvement": None if baseline is None or best_score is None else round(best_score - baseline, 4),
        "stop_reason": result.get("stop_reason"),
        "error": record.error,
        "search_kind": search_kind,
        "trials": trials,
        "best_so_far": best_so_far,
        "importance": _importance(searched, predictors),
        "choices": _choices(searched, predictors),
        "phases": phases,
        "total": total,
        "studies": {
            "search": None if study is None else f"dmipro:{job_id}",
            "full": None if full_study is None else full_study_name(f"dmipro:{job_id}"),
        },
    }


def fmt_cost(c: float | None) -> str:
    """A cost as the figure and the page print it; an unknown price reads ``unknown``, never $0."""
    if c is None:
        return "unknown"
    return f"${c:.4f}" if c < 1 else f"${c:,.2f}"
