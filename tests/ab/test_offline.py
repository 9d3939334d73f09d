"""Offline comparison: math_qa as written against the version a real optimization produced."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import dmipro
import dmipro.registry as registry
from dmipro.errors import ExperimentError
from dmipro.events import Event
from dmipro.storage import ProgramRecord
from examples.math_qa.program import build
from tests.ab.conftest import REF, REPO, subprocess_env
from tests.fixtures.jobs import DATA, JOB_FILE


def _job_file(tmp_path: Path) -> Path:
    """The demo's job with its data copied next to it (datasets stay in a job's directory),
    registering its result as math_qa."""
    job = yaml.safe_load(JOB_FILE.read_text())
    for key in ("trainset", "valset", "testset"):
        name = Path(job[key]).name
        shutil.copyfile(DATA / name, tmp_path / name)
        job[key] = name
    job["register"] = {"name": "math_qa", "deploy": False}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


@pytest.fixture
def versions(tmp_path: Path) -> Path:
    """math_qa@1 is the program as written; math_qa@2 is what MIPROv2 made of it on the simulated LM."""
    job = _job_file(tmp_path)
    registry.register("math_qa", ProgramRecord.from_program(build(), program_ref=REF), deploy=True)
    result = dmipro.optimize(job)
    assert result.registered == {"name": "math_qa", "version": 2, "deployed": False}
    return job


@pytest.mark.slow
def test_the_optimized_version_is_better_on_the_test_split(versions: Path,
                                                           recorded_events: list[Event]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dmipro.cli", "ab", "offline", "math_qa@1", "math_qa@2",
         "--job", str(versions), "--split", "test", "--json"],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    [line] = proc.stdout.strip().splitlines()  # exactly one JSON document on stdout
    result = json.loads(line)
    assert set(result) >= {"a", "b", "diff", "ci_low", "ci_high", "p_value", "n", "better"}
    assert result["a"]["version"] == "math_qa@1" and result["b"]["version"] == "math_qa@2"
    assert result["n"] == 300 and result["test"] == "mcnemar"
    assert result["better"] == "b" and result["p_value"] < 0.01
    assert result["ci_low"] <= result["diff"] <= result["ci_high"] and result["ci_low"] > 0
    assert result["diff"] == pytest.approx(result["b"]["score"] - result["a"]["score"], abs=0.02)

    # In process, the same comparison (same executor, same simulated LM) gives the same numbers.
    again = dmipro.ab.offline("math_qa@1", "math_qa@2", versions, split="test")
    assert {k: again[k] for k in ("a", "b", "diff", "p_value", "n")} == \
        {k: result[k] for k in ("a", "b", "diff", "p_value", "n")}
    [logged] = [e for e in recorded_events if e.name == "dspy.langfuse.comparison_logged"]
    assert logged.data["better"] == "b"


def test_versions_of_another_program_are_refused(tmp_path: Path) -> None:
    from tests.storage.programs import build_two_step

    registry.register("math_qa", ProgramRecord.from_program(build(), program_ref=REF))
    registry.register("other", ProgramRecord.from_program(build_two_step(),
                                                          program_ref="tests.storage.programs:build_two_step"))
    with pytest.raises(ExperimentError, match="predictors"):
        dmipro.ab.offline("math_qa@1", "other@1", _job_file(tmp_path), split="test")
