"""The production loop: outcomes after deployment, the regression check, rollback or alert."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import dmipro
import dmipro.registry as registry
from dmipro.config import reload_settings
from dmipro.events import Event
from tests.ab.conftest import register_two


def _auto_rollback(on: bool) -> None:
    Path(os.environ["DMIPRO_CONFIG"]).write_text(f"registry:\n  auto_rollback: {str(on).lower()}\n")
    reload_settings()


def _promoted_experiment() -> dmipro.ab.Experiment:
    """math_qa@2 beats @1 in an experiment (62% vs 50%) and is promoted."""
    register_two(deploy=1)
    exp = dmipro.ab.create("qa", control="math_qa@1", treatment="math_qa@2", mde=0.1)
    rng = np.random.default_rng(0)
    for i in range(3000):
        arm = exp.assign(f"u{i}")
        exp.record(f"u{i}", float(rng.random() < (0.62 if arm.name == "treatment" else 0.5)))
    assert exp.promote()["version"] == 2
    return exp


def _production(record: object, n: int, p: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        record(f"p{seed}-{i}", float(rng.random() < p))  # type: ignore[operator]


def test_a_regression_after_deployment_rolls_back_with_auto_rollback(
    database_url: str, recorded_events: list[Event]
) -> None:
    _auto_rollback(True)
    exp = _promoted_experiment()
    mon = dmipro.ab.monitor("qa", reference=1000, window=1000)  # an experiment's name finds its program
    assert (mon.program_name, mon.version) == ("math_qa", 2)
    assert mon.program.predict.signature.instructions.startswith("Think step by step")

    _production(exp.record, 600, 0.62, seed=1)  # the same API after the experiment: still good
    healthy = mon.check()
    assert healthy["status"] == "ok" and healthy["regression"] is False
    assert registry.show("math_qa").version == 2

    _production(mon.record, 1000, 0.40, seed=2)  # something upstream broke the new prompt
    result = mon.check()
    assert result["regression"] is True and result["action"] == "rollback"
    assert result["rolled_back_to"] == 1 and result["ci_high"] < 0
    assert registry.show("math_qa").version == 1
    assert dmipro.load("math_qa").predict.signature.instructions == "Answer the arithmetic word problem."
    assert mon.version == 1
    [regression] = [e for e in recorded_events if e.name == "dspy.ab.regression"]
    assert regression.data["action"] == "rollback" and regression.data["version"] == 2
    deploys = [e.data["action"] for e in recorded_events if e.name == "dspy.signature.deployed"]
    assert deploys[-1] == "rollback"


def test_without_auto_rollback_a_regression_only_alerts(recorded_events: list[Event]) -> None:
    _auto_rollback(False)
    _promoted_experiment()
    mon = dmipro.ab.monitor("math_qa", reference=1000, window=800)
    _production(mon.record, 800, 0.35, seed=3)
    result = mon.check()
    assert result["regression"] is True and result["action"] == "alert" and result["rolled_back_to"] is None
    assert registry.show("math_qa").version == 2
    mon.check()  # the same regression is announced once
    assert [e.data["action"] for e in recorded_events if e.name == "dspy.ab.regression"] == ["alert"]


def test_too_little_data_is_reported_not_judged() -> None:
    register_two(deploy=2)
    mon = dmipro.ab.monitor("math_qa", reference=100, window=100)
    _production(mon.record, 120, 0.1, seed=4)
    result = mon.check()
    assert result["status"] == "insufficient_data" and result["regression"] is False
    assert result["reference"]["n"] == 100 and result["recent"]["n"] == 20


def test_a_bad_production_outcome_is_refused_and_nothing_is_recorded() -> None:
    register_two(deploy=2)
    mon = dmipro.ab.monitor("math_qa", reference=100, window=100)
    with pytest.raises(dmipro.ExperimentError, match="latency_ms must be a finite non-negative number"):
        mon.record("u1", 1.0, latency_ms=-5.0)
    with pytest.raises(dmipro.ExperimentError, match="an outcome must be a finite number"):
        mon.record("u1", float("nan"))
    assert mon.flush() == 0 and mon.check()["reference"]["n"] == 0


def test_monitoring_a_program_with_nothing_deployed_is_a_clear_error() -> None:
    register_two(deploy=None)
    with pytest.raises(dmipro.NotFoundError, match="nothing of 'math_qa' is deployed"):
        dmipro.ab.monitor("math_qa")


def test_a_background_check_rolls_back_without_the_app_asking() -> None:
    import time

    _auto_rollback(True)
    _promoted_experiment()
    mon = dmipro.ab.monitor("math_qa", reference=1000, window=600, check_every_s=0.2)
    _production(mon.record, 600, 0.35, seed=5)
    deadline = time.monotonic() + 30
    while (mon.last_check or {}).get("action") != "rollback" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert registry.show("math_qa").version == 1
    assert mon.last_check is not None and mon.last_check["action"] == "rollback"
