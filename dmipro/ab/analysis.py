"""From per-unit data to a decision: arm summaries, the lift test, guardrails, the SRM check.

Pure functions of the data an experiment stored (see ``Experiment.units``) and its
settings; the statistics themselves are in :mod:`dmipro.ab.stats`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from dmipro.ab import stats

__all__ = ["DEFAULT_GUARDRAILS", "analyze", "is_binary", "sequential"]

DEFAULT_GUARDRAILS: dict[str, float] = {"latency_ms": 0.25, "cost_usd": 0.25, "error_rate": 0.02}
"""Largest tolerated increase of the treatment over control: relative (0.25 = +25%) for
latency, cost and tokens, absolute (0.02 = +2 points) for the error rate. A guardrail vetoes
a winner only when its confidence sequence shows the increase beyond the limit."""


def _num(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def is_binary(values: np.ndarray[Any, Any], metric_type: str = "auto") -> bool:
    """Whether outcomes are analysed as proportions: as declared, or (``auto``) when all are 0 or 1."""
    if metric_type != "auto":
        return metric_type == "binary"
    return bool(values.size == 0 or np.isin(values, (0.0, 1.0)).all())


def sequential(data: dict[str, Any], *, alpha: float, settings: dict[str, Any]) -> stats.SequentialPath:
    """The mSPRT path over an experiment's units in arrival order."""
    return stats.sequential_path(
        data["value"], data["treated"], alpha=alpha, mde=settings.get("mde"),
        binary=is_binary(data["value"], settings.get("metric_type", "auto")),
        min_n=int(settings.get("min_n", 20)),
    )


def analyze(data: dict[str, Any], *, alpha: float, split: float, metric: str,
            settings: dict[str, Any]) -> dict[str, Any]:
    """Summaries, lift, p-value, guardrails, SRM and the decision (see ``Experiment.analyze``)."""
    path = sequential(data, alpha=alpha, settings=settings)
    binary = is_binary(data["value"], settings.get("metric_type", "auto"))
    treated = data["treated"]
    n_t = int(treated.sum())
    n_c = int(treated.size - n_t)
    min_n = int(settings.get("min_n", 20))
    mode = settings.get("mode", "sequential")
    warnings: list[str] = []
    out: dict[str, Any] = {
        "metric_type": "binary" if binary else "continuous",
        "units": int(treated.size),
        "outcomes": data["outcomes"],
    }
    last = treated.size - 1
    for arm, member_path in (("control", path.control), ("treatment", path.treatment)):
        n = n_c if arm == "control" else n_t
        if treated.size:
            low, high = stats.arm_confidence_sequence(member_path, alpha=alpha, tau2=path.tau2, min_n=min_n,
                                                      binary=binary)
            out[arm] = {"n": n, "mean": _num(member_path.mean[last]), "ci_low": _num(low[last]),
                        "ci_high": _num(high[last])}
        else:
            out[arm] = {"n": 0, "mean": None, "ci_low": None, "ci_high": None}
    planned = _planned(settings, out["control"]["mean"], binary, alpha, split)
    out["planned_units"] = planned
    if mode == "fixed":
        decision = _fixed(out, data, binary, planned, alpha, split)
    else:
        decision = _sequential(out, path, planned, settings.get("mde"), alpha)
    out["guardrails"] = _guardrails(data, settings, alpha, min_n)
    vetoed = [k for k, g in out["guardrails"].items() if g.get("vetoed")]
    out["vetoed_by"] = vetoed
    if decision == "treatment" and vetoed:
        warnings.append(f"the treatment won on {metric} but guardrails veto it: {', '.join(vetoed)}")
        decision = "control"
    srm = stats.srm_p_value(n_c, n_t, split)
    out["srm_p_value"] = srm
    out["srm"] = srm is not None and srm < stats.SRM_ALPHA
    if out["srm"]:
        warnings.append(
            f"sample ratio mismatch: {n_c} control vs {n_t} treatment units for a split of {split} "
            f"(p={srm:.2g}); assignment or logging is broken, so no winner is declared"
        )
        if decision in ("treatment", "control"):
            decision = "continue"
    out["decision"] = decision
    out["warnings"] = warnings
    return out


def _planned(settings: dict[str, Any], control_mean: float | None, binary: bool, alpha: float,
             split: float) -> int | None:
    """Planned total units: ``max_units``, or the plan at ``baseline`` (else control's mean)."""
    if settings.get("max_units"):
        return int(settings["max_units"])
    mde = settings.get("mde")
    baseline = settings.get("baseline", control_mean)
    if not mde or baseline is None or not binary:
        return None
    baseline = min(max(float(baseline), 0.01), 0.99 - float(mde))
    try:
        plan = stats.plan(baseline, float(mde), power=float(settings.get("power", 0.8)), alpha=alpha,
                          split=split)
    except ValueError:
        return None
    key = "fixed" if settings.get("mode") == "fixed" else "sequential"
    return int(plan[key]["total"])


def _sequential(out: dict[str, Any], path: stats.SequentialPath, planned: int | None, mde: float | None,
                alpha: float) -> str:
    if path.p_value.size == 0:
        out.update(lift=None, lift_ci_low=None, lift_ci_high=None, relative_lift=None, p_value=1.0,
                   decided_at=None)
        return "continue"
    last = path.p_value.size - 1
    diff = _num(path.diff[last])
    low, high = _num(path.ci_low[last]), _num(path.ci_high[last])
    crossing = path.first_crossing(alpha)
    control_mean = out["control"]["mean"]
    out.update(
        lift=diff, lift_ci_low=low, lift_ci_high=high, p_value=float(path.p_value[last]),
        relative_lift=None if diff is None or not control_mean else diff / control_mean,
        decided_at=None if crossing is None else crossing + 1,
    )
    if crossing is not None:
        return "treatment" if (low is not None and low > 0) else "control"
    if mde and low is not None and high is not None and -mde < low and high < mde:
        return "no_difference"  # confident the effect is smaller than the one worth detecting
    if planned is not None and path.p_value.size >= planned:
        return "no_difference"
    return "continue"


def _fixed(out: dict[str, Any], data: dict[str, Any], binary: bool, planned: int | None, alpha: float,
           split: float) -> str:
    out.update(lift=None, lift_ci_low=None, lift_ci_high=None, relative_lift=None, p_value=None,
               decided_at=None)
    if planned is None:
        raise ValueError("a fixed-horizon experiment needs a plan: create it with baseline= and mde=")
    need_c = math.ceil(planned * (1 - split))
    need_t = math.ceil(planned * split)
    treated, values = data["treated"], data["value"]
    c, t = values[~treated][:need_c], values[treated][:need_t]
    if c.size < need_c or t.size < need_t:
        return "continue"  # a fixed-horizon test looks once, at the planned size
    res = stats.fixed_horizon(c, t, alpha=alpha, binary=binary)
    out.update(lift=res["diff"], lift_ci_low=res["ci_low"], lift_ci_high=res["ci_high"],
               p_value=res["p_value"], decided_at=need_c + need_t,
               relative_lift=res["diff"] / float(c.mean()) if c.mean() else None)
    if res["p_value"] <= alpha:
        return "treatment" if res["diff"] > 0 else "control"
    return "no_difference"


def _guardrails(data: dict[str, Any], settings: dict[str, Any], alpha: float, min_n: int) -> dict[str, Any]:
    limits: dict[str, float] = dict(settings.get("guardrails", DEFAULT_GUARDRAILS))
    treated = data["treated"]
    out: dict[str, Any] = {}
    for name, tolerance in limits.items():
        values = data[name]
        have = ~np.isnan(values)
        if have.sum() == 0:
            continue
        path = stats.sequential_path(values[have], treated[have], alpha=alpha, binary=name == "error_rate",
                                     min_n=min_n)
        last = int(have.sum()) - 1
        control_mean = _num(path.control.mean[last])
        limit = tolerance if name == "error_rate" else tolerance * abs(control_mean or 0.0)
        low = _num(path.ci_low[last])
        out[name] = {
            "control": control_mean,
            "treatment": _num(path.treatment.mean[last]),
            "diff": _num(path.diff[last]),
            "ci_low": low,
            "ci_high": _num(path.ci_high[last]),
            "limit": limit,
            "vetoed": low is not None and low > limit,
        }
    return out
