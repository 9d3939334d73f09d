"""``dmipro ab ...`` through the real dmipro app: text, one JSON document with --json, exit 2 on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

import dmipro
import dmipro.registry as registry
from dmipro.cli import app
from tests.ab.conftest import register_two


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def _fill(name: str, n: int = 2500) -> None:
    exp = dmipro.ab.get(name)
    rng = np.random.default_rng(1)
    for i in range(n):
        arm = exp.assign(f"u{i}")
        exp.record(f"u{i}", float(rng.random() < (0.62 if arm.name == "treatment" else 0.5)), latency_ms=80.0)
    exp.flush()


def test_create_list_status_plot_promote(tmp_path: Path) -> None:
    register_two()
    code, out, err = run("ab", "create", "cli-exp", "--control", "math_qa@1", "--treatment", "math_qa@2",
                         "--mde", "0.1", "--json")
    assert code == 0, err
    created = json.loads(out)
    assert (created["control"]["version"], created["treatment"]["version"]) == (1, 2)

    code, out, _ = run("ab", "list")
    assert code == 0 and "cli-exp" in out and "running" in out
    _fill("cli-exp")

    code, out, _ = run("ab", "status", "cli-exp", "--json")
    status = json.loads(out)
    assert code == 0 and status["decision"] == "treatment" and status["units"] == 2500
    code, out, _ = run("ab", "status", "cli-exp")
    assert code == 0 and "decision: treatment" in out and "lift" in out

    png = tmp_path / "lift.png"
    code, out, _ = run("ab", "plot", "cli-exp", "--out", str(png), "--json")
    assert code == 0 and json.loads(out)["decision"] == "treatment"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    code, out, _ = run("ab", "promote", "cli-exp", "--json")
    assert code == 0 and json.loads(out)["version"] == 2
    assert registry.show("math_qa").version == 2
    code, out, _ = run("ab", "list", "--json")
    assert json.loads(out)[0]["state"] == "promoted"


def test_stop_and_monitor() -> None:
    register_two()
    assert run("ab", "create", "s", "--control", "math_qa@1", "--treatment", "math_qa@2")[0] == 0
    _fill("s", 300)
    code, out, _ = run("ab", "stop", "s", "--json")
    assert code == 0 and json.loads(out)["state"] == "stopped"
    code, out, _ = run("ab", "monitor", "math_qa", "--reference", "100", "--window", "100", "--json")
    assert code == 0 and json.loads(out)["status"] == "insufficient_data"


def test_plan() -> None:
    code, out, _ = run("ab", "plan", "--baseline", "0.5", "--mde", "0.05", "--power", "0.8", "--json")
    plan = json.loads(out)
    assert code == 0 and plan["fixed"]["control"] == 1562
    assert plan["sequential"]["total"] > plan["fixed"]["total"]
    code, out, _ = run("ab", "plan", "--baseline", "0.5", "--mde", "0.05")
    assert code == 0 and "fixed horizon" in out and "sequential" in out


def test_bad_input_exits_2_with_one_line_and_writes_nothing() -> None:
    register_two()
    for args, reason in [
        (("ab", "status", "missing"), "no experiment named 'missing'"),
        (("ab", "create", "x", "--control", "math_qa@1", "--treatment", "math_qa@1"), "same version"),
        (("ab", "create", "x", "--control", "math_qa@1", "--treatment", "math_qa@2", "--split", "0"),
         "split"),
        (("ab", "plan", "--baseline", "1.2", "--mde", "0.05"), "baseline"),
        (("ab", "promote", "missing"), "no experiment"),
    ]:
        code, out, err = run(*args)
        assert code == 2 and out == "", args
        assert err.startswith("error: ") and reason in err and err.count("\n") == 1, err
    assert dmipro.ab.list() == []
