"""A/B statistics that survive peeking, plus the fixed-horizon and paired tests.

**Anytime-valid (the default).** The mixture sequential probability ratio test (mSPRT;
Robbins 1970; Johari, Pekelis, Walsh, "Always Valid Inference: Continuous Monitoring of
A/B Tests", Operations Research 2022). The difference of arm means after ``n`` units,
``d = mean_t - mean_c``, is approximately ``N(theta, V)`` with ``V = s_c^2/n_c + s_t^2/n_t``.
Mixing the likelihood ratio of ``theta`` against ``0`` over ``theta ~ N(0, tau^2)`` gives

    Lambda_n = sqrt(V / (V + tau^2)) * exp(tau^2 d^2 / (2 V (V + tau^2)))

which under the null is (asymptotically) a nonnegative martingale with mean 1, so by
Ville's inequality ``P(sup_n Lambda_n >= 1/alpha) <= alpha``: rejecting the first time
``Lambda_n >= 1/alpha`` is valid however often anyone looks. ``p_n = min(1, 1/max_k Lambda_k)``
is the always-valid p-value. Inverting the test gives the confidence sequence

    |d - theta| <= sqrt(V (V + tau^2) / tau^2 * (2 log(1/alpha) + log((V + tau^2) / V)))

valid at every ``n`` at once; its running intersection is reported. Variances are plug-in
estimates (Johari et al. section 4): ``p(1-p)`` for binary outcomes, shrunk as
``(x+1)/(n+2)`` so that a run of identical outcomes cannot make ``V`` zero, and the sample
variance for continuous ones. No test is made before each arm has ``min_n`` units.

**Choosing tau.** ``Lambda`` is largest when ``tau^2 = d^2 - V``; at the moment an effect
``delta`` is detected ``d^2 >> V``, so ``tau = mde`` (the minimum detectable effect, on the
metric's own scale) concentrates power where the plan expects the effect (Johari et al.
section 5). Without an ``mde``, ``tau`` is 0.1 pooled standard deviations (a small
standardized effect, about 5 points on a 50% conversion rate).

**Fixed horizon.** A two-sample z-test on exactly the planned number of units per arm,
valid at that one look only; :func:`plan` gives that number (normal approximation,
``scipy.stats.norm`` quantiles) and the sequential horizon at which the mSPRT reaches the
same power (a lower bound: it counts only the final look).

**Offline, paired.** McNemar's exact test for paired binary outcomes (a binomial test on
the discordant pairs, ``scipy.stats.binomtest``), the paired t-test for continuous ones,
and a paired bootstrap percentile interval of the mean difference for both.

**Sample-ratio mismatch.** Pearson's chi-square of observed against expected arm counts
(``scipy.stats.chisquare``); a p-value below ``SRM_ALPHA`` means assignment or logging is
broken and no winner may be declared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "DEFAULT_STANDARDIZED_TAU",
    "SRM_ALPHA",
    "ArmPath",
    "SequentialPath",
    "always_valid_p",
    "arm_confidence_sequence",
    "arm_path",
    "confidence_radius",
    "fixed_horizon",
    "log_mixture_lr",
    "mcnemar",
    "paired_bootstrap_ci",
    "paired_ttest",
    "plan",
    "sequential_path",
    "srm_p_value",
]

SRM_ALPHA = 0.001
"""Sample-ratio-mismatch threshold: the industry's usual 0.001, so that a check made at every
look rarely cries wolf, while a 45/55 split of a 50/50 experiment is caught within ~1,500 units."""

DEFAULT_STANDARDIZED_TAU = 0.1
"""The mixture scale in pooled standard deviations when no ``mde`` is given."""

Floats = NDArray[np.float64]


def log_mixture_lr(diff: ArrayLike, var: ArrayLike, tau2: ArrayLike) -> Floats:
    """``log Lambda`` of the normal-mixture SPRT for an estimate ``diff ~ N(theta, var)`` of ``theta = 0``.

    Vectorized; ``var <= 0`` or non-finite inputs give ``0`` (no evidence), never infinity.
    """
    d = np.asarray(diff, dtype=np.float64)
    v = np.asarray(var, dtype=np.float64)
    t = np.asarray(tau2, dtype=np.float64)
    ok = np.isfinite(d) & np.isfinite(v) & (v > 0) & (t > 0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        out = 0.5 * np.log(v / (v + t)) + t * d * d / (2.0 * v * (v + t))
    return np.where(ok, out, 0.0)


def confidence_radius(var: ArrayLike, tau2: ArrayLike, alpha: float) -> Floats:
    """Half-width of the mSPRT confidence sequence at each step (infinite where ``var`` is unknown)."""
    v = np.asarray(var, dtype=np.float64)
    t = np.asarray(tau2, dtype=np.float64)
    ok = np.isfinite(v) & (v > 0) & (t > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = v * (v + t) / t * (2.0 * math.log(1.0 / alpha) + np.log((v + t) / v))
        out = np.sqrt(r2)
    return np.where(ok, out, np.inf)


def always_valid_p(log_lr: ArrayLike) -> Floats:
    """Running always-valid p-value ``min(1, 1 / max_k Lambda_k)`` along the last axis."""
    running = np.maximum.accumulate(np.asarray(log_lr, dtype=np.float64), axis=-1)
    return np.minimum(1.0, np.exp(-running))


@dataclass(frozen=True)
class ArmPath:
    """Running count, mean and plug-in variance of one arm, per step of the unit stream."""

    n: Floats
    mean: Floats
    var: Floats


def arm_path(values: ArrayLike, member: ArrayLike, *, binary: bool) -> ArmPath:
    """Running statistics of the units where ``member`` is true, at every step (along the last axis).

    ``var`` is the per-unit variance estimate: ``q(1-q)`` with ``q = (x+1)/(n+2)`` for
    binary outcomes, the unbiased sample variance for continuous ones (``nan`` below 2 units).
    """
    x = np.asarray(values, dtype=np.float64)
    m = np.asarray(member, dtype=bool)
    n = np.cumsum(m, axis=-1, dtype=np.float64)
    xs = np.where(m, x, 0.0)
    s1 = np.cumsum(xs, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(n > 0, s1 / n, np.nan)
        if binary:
            q = (s1 + 1.0) / (n + 2.0)
            var = q * (1.0 - q)
        else:
            # Centre first: the variance is shift-invariant and cumulative sums of squares lose
            # precision on large offsets (latencies in the thousands, say).
            centre = np.nanmean(np.where(m, x, np.nan), axis=-1, keepdims=True) if m.any() else 0.0
            c = np.where(m, x - centre, 0.0)
            c1 = np.cumsum(c, axis=-1)
            c2 = np.cumsum(c * c, axis=-1)
            var = np.where(n > 1, (c2 - c1 * c1 / np.maximum(n, 1.0)) / np.maximum(n - 1.0, 1.0), np.nan)
            var = np.maximum(var, 0.0)
    return ArmPath(n, mean, var)


@dataclass(frozen=True)
class SequentialPath:
    """The mSPRT along a stream of units: one entry per unit, in arrival order.

    ``diff`` is treatment minus control; ``p_value`` is the always-valid p-value and
    ``ci_low``/``ci_high`` the running intersection of the confidence sequence. ``tested``
    marks the steps where both arms had ``min_n`` units.
    """

    control: ArmPath
    treatment: ArmPath
    diff: Floats
    var: Floats
    tau2: Floats
    log_lr: Floats
    p_value: Floats
    ci_low: Floats
    ci_high: Floats
    tested: NDArray[np.bool_]

    def first_crossing(self, alpha: float) -> int | None:
        """Index (0-based unit) of the first step where ``p_value <= alpha``; None if never (1-D paths)."""
        hits = np.flatnonzero(self.p_value <= alpha)
        return int(hits[0]) if hits.size else None


def sequential_path(
    values: ArrayLike,
    treated: ArrayLike,
    *,
    alpha: float = 0.05,
    mde: float | None = None,
    binary: bool = True,
    min_n: int = 20,
) -> SequentialPath:
    """The mSPRT of treatment vs control after every unit (see the module docstring).

    ``values`` holds each unit's outcome in arrival order and ``treated`` its arm; both may
    be 2-D (experiments x units), the path running along the last axis, which is how the
    simulation tests run hundreds of experiments at once.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    t = np.asarray(treated, dtype=bool)
    control = arm_path(values, ~t, binary=binary)
    treatment = arm_path(values, t, binary=binary)
    with np.errstate(divide="ignore", invalid="ignore"):
        var = control.var / control.n + treatment.var / treatment.n
        if mde is not None and mde > 0:
            tau2 = np.full_like(var, mde * mde)
        else:
            pooled = ((control.n * control.var) + (treatment.n * treatment.var)) / (control.n + treatment.n)
            tau2 = (DEFAULT_STANDARDIZED_TAU**2) * pooled
    diff = treatment.mean - control.mean
    tested = (control.n >= min_n) & (treatment.n >= min_n) & np.isfinite(var) & (var > 0)
    log_lr = np.where(tested, log_mixture_lr(diff, var, tau2), 0.0)
    radius = np.where(tested, confidence_radius(var, tau2, alpha), np.inf)
    with np.errstate(invalid="ignore"):
        low = np.where(tested, diff - radius, -np.inf)
        high = np.where(tested, diff + radius, np.inf)
    return SequentialPath(
        control=control,
        treatment=treatment,
        diff=diff,
        var=var,
        tau2=tau2,
        log_lr=log_lr,
        p_value=always_valid_p(log_lr),
        ci_low=np.maximum.accumulate(low, axis=-1),
        ci_high=np.minimum.accumulate(high, axis=-1),
        tested=tested,
    )


def arm_confidence_sequence(
    path: ArmPath, *, alpha: float, tau2: ArrayLike, min_n: int, binary: bool
) -> tuple[Floats, Floats]:
    """Confidence sequence of one arm's mean (the same mixture, one sample): valid at every step at once.

    Not intersected over time, so the interval always holds the current mean (the lift's
    sequence is intersected, because its decision is "zero left the interval at some step").

    A binary arm uses the variance bound 1/4 (a Bernoulli variable is 1/2-sub-Gaussian, so
    the normal mixture is an exact supermartingale: Howard, Ramdas, McAuliffe, Sekhon,
    "Time-uniform, nonparametric, nonasymptotic confidence sequences", Ann. Statist. 2021);
    plug-in variances undercover a single small proportion early on. A continuous arm uses
    its plug-in variance from ``max(min_n, 50)`` units.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        var = (0.25 if binary else path.var) / path.n
    ok = (path.n >= (min_n if binary else max(min_n, 50))) & np.isfinite(var) & (var > 0)
    radius = np.where(ok, confidence_radius(var, tau2, alpha), np.inf)
    with np.errstate(invalid="ignore"):
        low = np.where(ok, path.mean - radius, -np.inf)
        high = np.where(ok, path.mean + radius, np.inf)
    return low, high


def srm_p_value(n_control: int, n_treatment: int, split: float) -> float | None:
    """Chi-square p-value of the observed arm counts against the planned ``split`` (None without units)."""
    from scipy.stats import chisquare

    total = n_control + n_treatment
    if total == 0:
        return None
    expected = [total * (1.0 - split), total * split]
    return float(chisquare([n_control, n_treatment], f_exp=expected).pvalue)


def _z(q: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(q))


def _sequential_power(delta: float, var_unit: float, n_total: int, split: float, tau2: float,
                      alpha: float) -> float:
    """P(Lambda_N >= 1/alpha) at total ``n_total`` units under a true difference ``delta``."""
    from scipy.stats import norm

    v = var_unit / (n_total * (1.0 - split)) + var_unit / (n_total * split)
    z = float(confidence_radius(v, tau2, alpha)) / math.sqrt(v)
    shift = abs(delta) / math.sqrt(v)
    return float(norm.sf(z - shift) + norm.cdf(-z - shift))


def plan(
    baseline: float,
    mde: float,
    *,
    power: float = 0.8,
    alpha: float = 0.05,
    split: float = 0.5,
    sd: float | None = None,
) -> dict[str, Any]:
    """Units needed to detect an absolute effect ``mde`` over ``baseline`` with ``power``.

    Binary metrics (``sd`` None) use the unpooled normal approximation with variances
    ``p(1-p)`` at ``baseline`` and ``baseline + mde``; continuous ones the given ``sd`` in
    both arms. ``fixed`` is the two-sided z-test's horizon; ``sequential`` the horizon at
    which the mSPRT with ``tau = mde`` has at least ``power`` at its final look alone (the
    test may stop earlier; crossing earlier only adds power).
    """
    if not 0 < alpha < 1 or not 0 < power < 1:
        raise ValueError("alpha and power must be in (0, 1)")
    if not 0 < split < 1:
        raise ValueError(f"split must be in (0, 1), got {split}")
    if mde == 0 or not math.isfinite(mde):
        raise ValueError("mde must be a non-zero effect")
    if sd is None:
        p1, p2 = baseline, baseline + mde
        if not (0 < p1 < 1 and 0 < p2 < 1):
            raise ValueError(
                f"a binary metric needs 0 < baseline < 1 and 0 < baseline + mde < 1 (got {p1}, {p2})"
            )
        var_c, var_t = p1 * (1 - p1), p2 * (1 - p2)
    else:
        if sd <= 0:
            raise ValueError("sd must be positive")
        var_c = var_t = sd * sd
    za, zb = _z(1 - alpha / 2), _z(power)
    total_fixed = math.ceil((za + zb) ** 2 * (var_c / (1 - split) + var_t / split) / (mde * mde))
    var_unit = max(var_c, var_t)
    lo, hi = 2, max(4, total_fixed)
    while _sequential_power(mde, var_unit, hi, split, mde * mde, alpha) < power:
        hi *= 2
    while lo < hi:
        mid = (lo + hi) // 2
        if _sequential_power(mde, var_unit, mid, split, mde * mde, alpha) >= power:
            hi = mid
        else:
            lo = mid + 1
    return {
        "baseline": baseline,
        "mde": mde,
        "power": power,
        "alpha": alpha,
        "split": split,
        "metric": "binary" if sd is None else "continuous",
        "fixed": {
            "total": total_fixed,
            "control": math.ceil(total_fixed * (1 - split)),
            "treatment": math.ceil(total_fixed * split),
        },
        "sequential": {
            "total": hi,
            "control": math.ceil(hi * (1 - split)),
            "treatment": math.ceil(hi * split),
        },
    }


def fixed_horizon(
    control: ArrayLike, treatment: ArrayLike, *, alpha: float = 0.05, binary: bool = True
) -> dict[str, float]:
    """Two-sided two-sample z-test (Welch's variance) of ``mean(treatment) - mean(control)``, one look."""
    from scipy.stats import norm

    c = np.asarray(control, dtype=np.float64)
    t = np.asarray(treatment, dtype=np.float64)
    if c.size < 2 or t.size < 2:
        raise ValueError("a fixed-horizon test needs at least 2 units per arm")
    if binary:
        var = c.mean() * (1 - c.mean()) / c.size + t.mean() * (1 - t.mean()) / t.size
    else:
        var = c.var(ddof=1) / c.size + t.var(ddof=1) / t.size
    diff = float(t.mean() - c.mean())
    se = math.sqrt(var) if var > 0 else 0.0
    if se == 0:
        p = 1.0 if diff == 0 else 0.0
        return {"diff": diff, "ci_low": diff, "ci_high": diff, "p_value": p}
    half = _z(1 - alpha / 2) * se
    return {
        "diff": diff,
        "ci_low": diff - half,
        "ci_high": diff + half,
        "p_value": float(2 * norm.sf(abs(diff) / se)),
    }


def mcnemar(a: ArrayLike, b: ArrayLike) -> dict[str, float]:
    """McNemar's exact test for paired binary outcomes ``a``, ``b`` (0/1 per example).

    Returns the discordant counts ``a_only`` (a right, b wrong) and ``b_only`` and the
    two-sided p-value of the binomial test of ``b_only`` among the discordant pairs.
    """
    from scipy.stats import binomtest

    x = np.asarray(a, dtype=np.float64) > 0.5
    y = np.asarray(b, dtype=np.float64) > 0.5
    a_only = int(np.sum(x & ~y))
    b_only = int(np.sum(~x & y))
    discordant = a_only + b_only
    p = 1.0 if discordant == 0 else float(binomtest(b_only, discordant, 0.5).pvalue)
    return {"a_only": a_only, "b_only": b_only, "p_value": min(1.0, p)}


def paired_ttest(a: ArrayLike, b: ArrayLike) -> float:
    """Two-sided paired t-test p-value of ``mean(b - a) = 0``."""
    from scipy.stats import ttest_rel

    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    if d.size < 2:
        return 1.0
    if np.allclose(d, d[0]):  # no spread: either no difference at all or a certain one
        return 1.0 if d[0] == 0 else 0.0
    return float(ttest_rel(b, a).pvalue)


def paired_bootstrap_ci(
    a: ArrayLike, b: ArrayLike, *, alpha: float = 0.05, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(b - a)``, resampling examples (pairs) with replacement."""
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    if d.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    step = max(1, 2_000_000 // max(1, d.size))  # bound memory: resample in blocks
    for lo in range(0, resamples, step):
        k = min(step, resamples - lo)
        idx = rng.integers(0, d.size, size=(k, d.size))
        means[lo : lo + k] = d[idx].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)
