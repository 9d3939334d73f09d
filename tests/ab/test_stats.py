"""The statistics, by simulation: power at the planned size, false positives under peeking, SRM, paired tests.

The guarantees are shown, not asserted from the formulas: each test simulates many
experiments (vectorized with numpy, so the suite runs in seconds) and counts.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from dmipro.ab import stats


def _experiments(rng: np.random.Generator, n_exp: int, n_units: int, p_control: float, p_treatment: float,
                 split: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    treated = rng.random((n_exp, n_units)) < split
    values = (rng.random((n_exp, n_units)) < np.where(treated, p_treatment, p_control)).astype(float)
    return values, treated


def test_plan_matches_the_textbook_sample_size() -> None:
    plan = stats.plan(0.5, 0.05, power=0.8)
    # (z_.975 + z_.8)^2 * (0.5*0.5 + 0.55*0.45) / 0.05^2 = 1562.0 per arm
    assert plan["fixed"]["control"] == plan["fixed"]["treatment"] == pytest.approx(1562, abs=1)
    assert plan["sequential"]["total"] > plan["fixed"]["total"]  # the price of looking at any time


def test_the_treatment_wins_within_the_planned_size_in_at_least_80_percent() -> None:
    """True lift of 10 points on a 50% base; 200 experiments run to the sequential plan's size."""
    plan = stats.plan(0.5, 0.10, power=0.8)
    horizon = plan["sequential"]["total"]
    values, treated = _experiments(np.random.default_rng(2024), 200, horizon, 0.5, 0.6)
    path = stats.sequential_path(values, treated, alpha=0.05, mde=0.10)
    won = (path.p_value[:, -1] <= 0.05) & (path.ci_low[:, -1] > 0)
    lost = (path.p_value[:, -1] <= 0.05) & (path.ci_high[:, -1] < 0)
    assert won.mean() >= 0.80, f"power {won.mean():.3f} at {horizon} units"
    assert not lost.any()


@pytest.mark.parametrize("mde", [0.05, 0.10, None])
def test_aa_experiments_checked_every_100_units_rarely_declare_a_winner(mde: float | None) -> None:
    """500 A/A experiments, looked at after every 100 units up to 2,000: at most 5% declare a winner."""
    values, treated = _experiments(np.random.default_rng(7), 500, 2000, 0.5, 0.5)
    path = stats.sequential_path(values, treated, alpha=0.05, mde=mde)
    looks = np.arange(99, 2000, 100)
    declared = (path.p_value[:, looks] <= 0.05).any(axis=1)
    assert declared.mean() <= 0.05, f"false-positive rate {declared.mean():.3f}"

    # The same looks with a fixed-horizon z-test: peeking manufactures winners.
    c, t = path.control, path.treatment
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (t.mean - c.mean) / np.sqrt(c.mean * (1 - c.mean) / c.n + t.mean * (1 - t.mean) / t.n)
    naive = (np.abs(z[:, looks]) > 1.959964).any(axis=1)
    assert naive.mean() > 0.10


def test_the_confidence_sequence_covers_the_true_lift_at_every_look() -> None:
    values, treated = _experiments(np.random.default_rng(11), 500, 3000, 0.3, 0.35)
    path = stats.sequential_path(values, treated, alpha=0.05, mde=0.05)
    # The running intersection at the end is inside every interval along the way.
    missed = (path.ci_low[:, -1] > 0.05) | (path.ci_high[:, -1] < 0.05)
    assert missed.mean() <= 0.05
    low, high = stats.arm_confidence_sequence(path.treatment, alpha=0.05, tau2=path.tau2, min_n=20,
                                              binary=True)
    assert ((low[:, -1] > 0.35) | (high[:, -1] < 0.35)).mean() <= 0.05


def test_continuous_outcomes_use_the_sample_variance() -> None:
    rng = np.random.default_rng(5)
    treated = rng.random((300, 1500)) < 0.5
    values = rng.normal(10.0, 3.0, size=(300, 1500)) + np.where(treated, 0.0, 0.0)
    path = stats.sequential_path(values, treated, alpha=0.05, binary=False, mde=0.5)
    assert (path.p_value[:, -1] <= 0.05).mean() <= 0.05
    assert path.treatment.var[0, -1] == pytest.approx(9.0, rel=0.15)
    shifted = values + np.where(treated, 1.0, 0.0)
    power = stats.sequential_path(shifted, treated, alpha=0.05, binary=False, mde=0.5)
    assert ((power.p_value[:, -1] <= 0.05) & (power.ci_low[:, -1] > 0)).mean() > 0.9


def test_a_45_55_split_on_a_50_50_experiment_is_flagged() -> None:
    assert stats.srm_p_value(900, 1100, 0.5) < stats.SRM_ALPHA
    rng = np.random.default_rng(3)
    honest = rng.binomial(2000, 0.5, size=1000)
    flagged = [stats.srm_p_value(int(2000 - k), int(k), 0.5) < stats.SRM_ALPHA for k in honest]
    assert np.mean(flagged) <= 0.01
    assert stats.srm_p_value(0, 0, 0.5) is None


def test_fixed_horizon_power_matches_its_plan() -> None:
    plan = stats.plan(0.5, 0.10, power=0.8)
    n = plan["fixed"]["control"]
    rng = np.random.default_rng(9)
    hits = 0
    for _ in range(1000):
        c = (rng.random(n) < 0.5).astype(float)
        t = (rng.random(n) < 0.6).astype(float)
        hits += stats.fixed_horizon(c, t)["p_value"] <= 0.05
    assert 0.76 <= hits / 1000 <= 0.85


def test_mcnemar_is_the_exact_binomial_test_on_discordant_pairs() -> None:
    a = np.array([1] * 20 + [1] * 1 + [0] * 9 + [0] * 10)
    b = np.array([1] * 20 + [0] * 1 + [1] * 9 + [0] * 10)
    res = stats.mcnemar(a, b)
    assert (res["a_only"], res["b_only"]) == (1, 9)
    assert res["p_value"] == pytest.approx(2 * 11 / 1024)
    assert stats.mcnemar(a, a)["p_value"] == 1.0


def test_paired_bootstrap_interval_is_centred_and_sized_like_the_paired_t() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(0, 1, 400)
    b = a + 0.3 + rng.normal(0, 0.5, 400)
    low, high = stats.paired_bootstrap_ci(a, b, seed=1)
    d = b - a
    half = 1.96 * d.std(ddof=1) / math.sqrt(d.size)
    assert low < d.mean() < high
    assert (high - low) == pytest.approx(2 * half, rel=0.15)
    assert stats.paired_ttest(a, b) < 1e-6


def test_bad_plans_are_refused() -> None:
    with pytest.raises(ValueError, match="baseline"):
        stats.plan(0.98, 0.05)
    with pytest.raises(ValueError, match="mde"):
        stats.plan(0.5, 0.0)
