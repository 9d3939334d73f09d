"""The CLI against real Celery workers: submit and wait give what optimize gives on threads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dmipro.jobs import JobStore, load_job
from dmipro.jobs.submit import wait
from tests.contract.workers import Stack
from tests.integration.conftest import small_job

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
JOB = "examples/math_qa/job.yaml"


def dmipro(*args: str, timeout: float = 300) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "dmipro.cli", *args], cwd=REPO, env=dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_submit_and_wait_give_the_same_best_program_as_optimize_on_threads(celery_stack: Stack) -> None:
    job_id = dmipro("submit", JOB, "--executor", "celery", "--json")["job_id"]
    remote = dmipro("wait", job_id, "--timeout", "240", "--json")
    assert remote["state"] == "succeeded", (remote, celery_stack.logs())
    local = dmipro("optimize", JOB, "--executor", "thread", "--json")
    assert remote["best_score"] == local["best_score"] and remote["baseline_score"] == local["baseline_score"]
    assert json.loads(Path(remote["program_path"]).read_text())["predict"] == \
        json.loads(Path(local["program_path"]).read_text())["predict"]


def test_a_worker_refuses_refs_outside_its_allowlist(celery_stack: Stack) -> None:
    from dmipro.executor_adapters.celery import CeleryAdapter

    # Written past the submitter's validation, as a job from a more permissive client would be.
    spec = load_job(small_job()).to_json()
    spec["program"] = "this:s"  # the stdlib module that prints on import: not under examples or tests
    record = JobStore().create(name="outside", spec=spec, executor="celery")
    CeleryAdapter.enqueue_coordinator(record.id)
    report = wait(record.id, timeout=60)
    assert report["state"] == "failed"
    assert "module 'this' is not in DMIPRO_ALLOWED_MODULES" in report["error"]
    assert "The Zen of Python" not in celery_stack.logs()
