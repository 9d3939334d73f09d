"""Provider faults over real HTTP: ``dmipro sim serve`` behind ``dspy.LM`` and litellm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from dmipro.lm.server import SimHTTPServer, serve_in_thread
from tests.fixtures.jobs import records

REPO = Path(__file__).resolve().parents[2]
KEY_ENV = "DMIPRO_TEST_SIM_API_KEY"


@pytest.fixture
def rejecting_server() -> Iterator[SimHTTPServer]:
    server = serve_in_thread(reject_key=True)
    yield server
    server.shutdown()
    server.server_close()


def _job(tmp_path: Path, url: str) -> Path:
    lm = {"model": "openai/sim-math", "api_base": url, "api_key_env": KEY_ENV, "cache": False}
    job = {
        "name": "rejected",
        "program": "examples.math_qa.program:build",
        "metric": "examples.math_qa.program:exact_match",
        "trainset": records("train", 20),
        "valset": records("dev", 20),
        "input_keys": ["question"],
        "lm": {**lm, "temperature": 0.0},
        "prompt_lm": {**lm, "temperature": 1.0},
        "optimizer": {"auto": "light", "seed": 9},
        "executor": {"backend": "thread", "concurrency": 16},
        "register": {"name": "rejected_program", "deploy": False},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job), encoding="utf-8")
    return path


def test_a_rejected_key_fails_the_job_fast_naming_the_variable(
    tmp_path: Path, rejecting_server: SimHTTPServer
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DMIPRO_")}
    env.update(
        DMIPRO_HOME=str(tmp_path / "home"),
        DMIPRO_ALLOWED_MODULES="examples,tests",
        DMIPRO_CONFIG=str(tmp_path / "no-dmipro.yaml"),
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        PYTHONPATH=str(REPO),
        **{KEY_ENV: "sk-revoked-0000"},
    )
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "dmipro.cli", "optimize", str(_job(tmp_path, rejecting_server.url)), "--json"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr
    assert f"${KEY_ENV} (401)" in proc.stderr
    assert "sk-revoked" not in proc.stderr + proc.stdout  # the key itself is never printed
    assert elapsed < 60
    assert 1 <= rejecting_server.stats["total"] <= 36, rejecting_server.stats
    assert set(rejecting_server.stats) == {"401", "total"}
    # nothing registered, and the job row says why it failed
    listed = subprocess.run(
        [sys.executable, "-m", "dmipro.cli", "jobs", "--json"], cwd=REPO, env=env, capture_output=True,
        text=True, timeout=60,
    )
    [job] = json.loads(listed.stdout)
    assert job["state"] == "failed" and f"${KEY_ENV}" in job["error"]
    versions = subprocess.run(
        [sys.executable, "-m", "dmipro.cli", "registry", "list", "--json"], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=60,
    )
    assert "rejected_program" not in versions.stdout
