"""A/B observability: OTel metrics per arm, a regression alert span, Langfuse scores per arm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import dmipro
from dmipro import observability
from dmipro.config import Settings, reload_settings
from dmipro.subscribers.langfuse import trace_id
from tests.ab.conftest import REPO, register_two, subprocess_env
from tests.subscribers._support import FakeLangfuse, metric_points


@pytest.fixture(autouse=True)
def _quiet(quiet_otel: None) -> None:
    """OTLP export off; subscribers switched off after each test."""


def _run(n: int = 400) -> Counter[str]:
    """An experiment with ``n`` outcomes, a decision, a promotion and a regression; returns units per arm."""
    Path(os.environ["DMIPRO_CONFIG"]).write_text("registry:\n  auto_rollback: true\n")
    reload_settings()
    register_two()
    exp = dmipro.ab.create("obs", control="math_qa@1", treatment="math_qa@2", mde=0.1)
    rng = np.random.default_rng(0)
    arms: Counter[str] = Counter()
    for i in range(n):
        arm = exp.assign(f"u{i}")
        arms[arm.name] += 1
        exp.record(f"u{i}", float(rng.random() < (0.9 if arm.name == "treatment" else 0.3)),
                   latency_ms=50.0, error=i % 100 == 0)
    assert exp.analyze()["decision"] == "treatment"
    exp.promote()
    mon = dmipro.ab.monitor("math_qa", reference=100, window=100)
    for i in range(300):
        mon.record(f"p{i}", 0.0)
    assert mon.check()["action"] == "rollback"
    return arms


def test_otel_counts_outcomes_per_arm_and_alerts_on_a_regression() -> None:
    exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
    assert observability.setup(Settings(subscribers=("otel",)), span_exporters=[exporter],
                               metric_readers=[reader]) == ("otel",)
    arms = _run()
    observability.flush()
    metrics = metric_points(reader)
    outcomes = {p.attributes["dmipro.ab.arm"]: p.value for p in metrics["dmipro.ab.outcomes"]
                if p.attributes["dmipro.ab.experiment"] == "obs"}
    assert outcomes == {"control": arms["control"], "treatment": arms["treatment"]}
    values = {p.attributes["dmipro.ab.arm"]: p for p in metrics["dmipro.ab.value"]
              if p.attributes["dmipro.ab.experiment"] == "obs"}
    def rate(arm: str) -> float:
        return float(values[arm].sum / values[arm].count)

    assert rate("treatment") > rate("control")
    assert sum(p.value for p in metrics["dmipro.ab.errors"]) == 4
    [decision] = metrics["dmipro.ab.decisions"]
    assert decision.attributes["dmipro.ab.decision"] == "treatment"
    [regression] = metrics["dmipro.ab.regressions"]
    assert regression.attributes["dmipro.ab.action"] == "rollback" and regression.value == 1
    [span] = [s for s in exporter.get_finished_spans() if s.name == "dmipro.ab.regression"]
    assert [e.name for e in span.events] == ["dspy.ab.regression"]
    assert span.attributes["dmipro.data.program"] == "math_qa"


def test_langfuse_scores_are_tagged_with_experiment_and_arm(fake_langfuse: FakeLangfuse) -> None:
    assert observability.setup(Settings(subscribers=("langfuse",))) == ("langfuse",)
    arms = _run()
    observability.flush()
    scores = fake_langfuse.scores()
    outcome = [s for s in scores if s["name"] == "success"]
    experiment = [s for s in outcome if s["traceId"] == trace_id("ab:obs")]
    assert Counter(s["metadata"]["arm"] for s in experiment) == arms
    assert {(s["metadata"]["arm"], s["metadata"]["prompt_label"]) for s in experiment} == \
        {("control", "v1"), ("treatment", "v2")}
    assert all(s["metadata"]["experiment"] == "obs" for s in experiment)
    [lift] = [s for s in scores if s["name"] == "ab_lift"]
    assert lift["value"] > 0.3 and lift["metadata"]["decision"] == "treatment"
    [regression] = [s for s in scores if s["name"] == "ab_regression"]
    assert regression["traceId"] == trace_id("ab:monitor:math_qa") and regression["value"] < 0
    assert regression["metadata"]["action"] == "rollback"


NEWRELIC_SCRIPT = """
import json
import newrelic.agent as nr

nr.initialize()
application = nr.register_application(timeout=10)
assert application.active

from dmipro import observability
from tests.ab.test_observability import _run

observability.setup()
arms = _run()
app = nr.application()
core = app._agent.application(app.name)
events = [{"type": e[0]["type"], **e[1]} for e in core._stats_engine.custom_events]
metrics = {}
for engine in (core._stats_engine, core._stats_custom_engine):
    for (name, scope), stats in engine.stats_table.items():
        metrics[name] = list(stats)[:3]
print("RESULT " + json.dumps({"arms": arms, "events": events, "metrics": metrics}))
observability.shutdown()
nr.shutdown_agent(timeout=10)
"""


@pytest.mark.slow
def test_new_relic_records_decisions_regressions_and_per_arm_metrics(tmp_path: Path) -> None:
    skip = ("NEW_RELIC_", "LANGFUSE_", "OTEL_")
    env = {k: v for k, v in subprocess_env().items() if not k.startswith(skip)}
    env.update(NEW_RELIC_DEVELOPER_MODE="true", NEW_RELIC_APP_NAME="dmipro-test",
               NEW_RELIC_LOG_LEVEL="warning", DMIPRO_SUBSCRIBERS="newrelic",
               DMIPRO_HOME=str(tmp_path / "home"),
               DMIPRO_CONFIG=str(tmp_path / "dmipro.yaml"), DMIPRO_ALLOWED_MODULES="examples,tests")
    env.pop("DMIPRO_DATABASE_URL", None)
    proc = subprocess.run([sys.executable, "-c", NEWRELIC_SCRIPT], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT "):])
    [decision] = [e for e in result["events"] if e["type"] == "ABDecision"]
    assert decision["experiment"] == "obs" and decision["decision"] == "treatment" and decision["lift"] > 0
    [regression] = [e for e in result["events"] if e["type"] == "ABRegression"]
    assert regression["program"] == "math_qa" and regression["action"] == "rollback"
    for arm, units in result["arms"].items():
        assert result["metrics"][f"Custom/dmipro/ab/obs/{arm}/value"][0] == units  # call count per arm
