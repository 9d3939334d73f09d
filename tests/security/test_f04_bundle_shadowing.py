"""Finding 4: a job bundle's own ``examples/`` must not shadow the real package, nor run on validate."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

from tests.fixtures.jobs import math_job

REPO = Path(__file__).resolve().parents[2]


def test_f04_validating_a_bundle_runs_the_installed_code_not_the_bundles(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    marker = tmp_path / "bundle-code-ran"
    package = bundle / "examples" / "math_qa"
    package.mkdir(parents=True)
    (bundle / "examples" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    # The bundle's look-alike of the allowlisted module: it runs code as soon as it is imported.
    (package / "program.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from dspy import ChainOfThought as _C\n"
        "def build():\n    return _C('question -> answer')\n"
        "def exact_match(example, prediction, trace=None):\n    return 1.0\n"
    )
    (bundle / "job.yaml").write_text(yaml.safe_dump(math_job(5)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "DMIPRO_HOME": str(tmp_path / "home"),
           "DMIPRO_CONFIG": str(tmp_path / "none.yaml"), "DMIPRO_ALLOWED_MODULES": "examples"}
    env.pop("DMIPRO_DATABASE_URL", None)
    run = subprocess.run([str(REPO / ".venv" / "bin" / "dmipro"), "validate", str(bundle / "job.yaml")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert not marker.exists(), "dmipro validate imported the bundle's examples/ instead of the real package"
    assert run.returncode == 0, run.stderr
