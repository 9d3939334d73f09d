"""A job's optimized program comes from the job database, not from the coordinator's disk.

The coordinator runs on a real Celery worker with its own ``DMIPRO_HOME``; the result is
fetched from another process whose ``DMIPRO_HOME`` is a different, empty directory and
which shares only the job database.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dmipro.jobs import JobStore
from dmipro.jobs.submit import submit
from tests.contract.workers import Stack
from tests.integration.conftest import small_job
from tests.test_cli_foundation import REPO

FETCH = """
import json, sys
from dmipro.jobs.submit import JobHandle
program = JobHandle(sys.argv[1]).result()
print(json.dumps({"instruction": program.predict.signature.instructions,
                  "demos": [d if isinstance(d, dict) else d.toDict() for d in program.predict.demos]}))
"""


@pytest.mark.integration
def test_result_is_fetched_by_a_process_with_another_home(celery_stack: Stack, tmp_path: Path) -> None:
    handle = submit(small_job(), executor="celery")
    report = handle.wait(timeout=180)
    assert report["state"] == "succeeded", celery_stack.logs()
    assert report["program_id"]
    best = JobStore().get(handle.job_id).result["best_candidate"]["predict"]  # type: ignore[index]

    elsewhere = tmp_path / "another-machine"
    elsewhere.mkdir()
    env = {**celery_stack.envs["celery"], "DMIPRO_HOME": str(elsewhere), "PYTHONPATH": str(REPO)}
    assert not Path(report["program_path"]).is_relative_to(elsewhere)
    proc = subprocess.run(
        [sys.executable, "-c", FETCH, handle.job_id],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    fetched = json.loads(proc.stdout)
    assert fetched["instruction"] == best["instruction"]
    assert fetched["demos"] == best.get("demos", [])
    assert os.listdir(elsewhere) == []  # nothing read from or written to that home
