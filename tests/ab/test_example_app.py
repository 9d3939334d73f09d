"""examples/ab_app.py from a fresh home: both versions registered, users served, a decision printed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ab.conftest import REPO, subprocess_env


@pytest.mark.slow
def test_the_example_app_finds_the_optimized_version_better_and_promotes_it(tmp_path: Path) -> None:
    env = subprocess_env()
    env["DMIPRO_HOME"] = str(tmp_path / "home")
    proc = subprocess.run([sys.executable, "examples/ab_app.py", "--users", "1000", "--promote", "--json"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [line] = proc.stdout.strip().splitlines()
    result = json.loads(line)
    assert result["decision"] == "treatment" and result["p_value"] <= 0.05
    assert result["treatment"]["mean"] > result["control"]["mean"]
    assert result["promoted"]["spec"] == "math_qa@2"
    shown = subprocess.run([sys.executable, "-m", "dmipro.cli", "registry", "show", "math_qa", "--json"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert json.loads(shown.stdout)["version"]["version"] == 2  # deployed
