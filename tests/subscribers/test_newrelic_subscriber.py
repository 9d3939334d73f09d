"""New Relic in developer mode (no collector): a run's custom events and metrics, and background tasks.

The agent's state is process-wide and cannot be undone, so the run happens in a subprocess
that prints what the agent recorded as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from dmipro.subscribers.newrelic import agent_active, background_task

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import json
    import newrelic.agent as nr

    nr.initialize()
    application = nr.register_application(timeout=10)
    assert application.active

    import dmipro.registry as registry
    from dmipro import observability
    from dmipro.events import bus
    from tests.subscribers._support import register_versions, run_tiny

    observability.setup()
    job_id, summary = run_tiny()
    register_versions(job_id)
    registry.deploy("math_qa", 1)
    registry.deploy("math_qa", 2)
    registry.rollback("math_qa")
    bus.emit("dspy.optimization.error", job_id="job-failed", error="key sk-planted-0123456789abcdef rejected",
             error_type="AuthenticationError")
    with observability.background_task("evaluate_chunk"):
        nr.record_custom_metric("Custom/dmipro/test/inside_task", 1)

    app = nr.application()
    core = app._agent.application(app.name)
    events = [{"type": e[0]["type"], **e[1]} for e in core._stats_engine.custom_events]
    metrics = {}
    for engine in (core._stats_engine, core._stats_custom_engine):
        for (name, scope), stats in engine.stats_table.items():
            metrics[name] = list(stats)[:3]
    result = {"job_id": job_id, "summary": summary, "events": events, "metrics": metrics}
    print("RESULT " + json.dumps(result))
    observability.shutdown()
    nr.shutdown_agent(timeout=10)
    """
)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    home = tmp_path_factory.mktemp("nr-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NEW_RELIC_", "LANGFUSE_", "OTEL_"))}
    env.update(
        NEW_RELIC_DEVELOPER_MODE="true",
        NEW_RELIC_APP_NAME="dmipro-test",
        NEW_RELIC_LOG_LEVEL="warning",
        DMIPRO_SUBSCRIBERS="newrelic",
        DMIPRO_HOME=str(home),
        DMIPRO_CONFIG=str(home / "none.yaml"),
        DMIPRO_ALLOWED_MODULES="examples,tests",
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    env.pop("DMIPRO_DATABASE_URL", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result: dict[str, Any] = json.loads(line[len("RESULT "):])
    result["output"] = proc.stdout + proc.stderr
    return result


def _events(recorded: dict[str, Any], event_type: str) -> list[dict[str, Any]]:
    return [e for e in recorded["events"] if e["type"] == event_type]


def test_a_run_is_one_optimization_run_event(recorded: dict[str, Any]) -> None:
    summary = recorded["summary"]
    (run,) = [e for e in _events(recorded, "OptimizationRun") if e["job_id"] == recorded["job_id"]]
    assert run["status"] == "succeeded"
    for key in ("best_score", "baseline_score", "trials", "lm_calls", "tokens", "stop_reason"):
        assert run[key] == summary[key], key
    assert run["cost_usd"] == pytest.approx(summary["cost_usd"])
    assert run["improvement"] == pytest.approx(summary["best_score"] - summary["baseline_score"])


def test_each_trial_is_an_optimization_trial_event(recorded: dict[str, Any]) -> None:
    trials = _events(recorded, "OptimizationTrial")
    assert trials and all(t["job_id"] == recorded["job_id"] for t in trials)
    assert sorted(t["trial"] for t in trials) == list(range(1, len(trials) + 1))
    assert {t["kind"] for t in trials} >= {"baseline", "minibatch", "full"}
    assert all(0 <= t["score"] <= 100 and t["duration_s"] >= 0 for t in trials)
    score = recorded["metrics"]["Custom/dmipro/trial/score"]
    assert score[0] == len(trials) and score[1] == pytest.approx(sum(t["score"] for t in trials))
    assert recorded["metrics"]["Custom/dmipro/trial/duration"][0] == len(trials)


def test_deploys_and_rollbacks_are_signature_deployed_events(recorded: dict[str, Any]) -> None:
    deployed = _events(recorded, "SignatureDeployed")
    assert [(d["name"], d["version"], d["action"]) for d in deployed] == [
        ("math_qa", 1, "deploy"), ("math_qa", 2, "deploy"), ("math_qa", 1, "rollback")
    ]
    assert deployed[1]["previous_version"] == 1


def test_lm_metrics_add_up_to_the_runs_usage(recorded: dict[str, Any]) -> None:
    summary, metrics = recorded["summary"], recorded["metrics"]
    assert metrics["Custom/dmipro/lm/calls"][0] == summary["lm_calls"]
    tokens = metrics["Custom/dmipro/lm/tokens/input"][1] + metrics["Custom/dmipro/lm/tokens/output"][1]
    assert tokens == summary["tokens"]
    assert metrics["Custom/dmipro/lm/cost_usd"][1] == pytest.approx(summary["cost_usd"])


def test_worker_tasks_are_background_transactions(recorded: dict[str, Any]) -> None:
    metrics = recorded["metrics"]
    # The run's own tasks (dmipro.tasks.execute wraps each one), plus the one opened by hand above.
    assert metrics["OtherTransaction/dmipro/evaluate_chunk"][0] >= 2
    assert metrics["OtherTransaction/dmipro/bootstrap_demo_set"][0] >= 1
    assert metrics["OtherTransaction/dmipro/propose_instruction"][0] >= 1
    assert metrics["Custom/dmipro/test/inside_task"][0] == 1


def test_a_failed_run_is_recorded_without_the_key_it_mentions(recorded: dict[str, Any]) -> None:
    (failed,) = [e for e in _events(recorded, "OptimizationRun") if e["job_id"] == "job-failed"]
    assert failed["status"] == "failed" and failed["error_type"] == "AuthenticationError"
    assert "sk-planted" not in json.dumps(recorded["events"])
    assert "[REDACTED]" in failed["error"]


def test_background_task_is_a_no_op_without_the_agent() -> None:
    assert not agent_active()
    with background_task("evaluate_chunk"):
        ran = True
    assert ran
