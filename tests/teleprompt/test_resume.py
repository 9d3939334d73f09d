"""A run killed in phase 3 resumes: no bootstrap or proposal work again, the study continues."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

import dmipro
from dmipro.executor_adapters import ThreadAdapter
from dmipro.jobs import JobState, JobStore
from tests.teleprompt.conftest import small_spec

REPO = Path(__file__).resolve().parents[2]


class RecordingExecutor(ThreadAdapter):
    """A thread pool that remembers which tasks it was asked to run."""

    def __init__(self, concurrency: int) -> None:
        super().__init__(concurrency)
        self.tasks: list[str] = []

    def _ship(self, task: str, body: str) -> Any:
        self.tasks.append(task)
        return super()._ship(task, body)


def _wait_for(cond: Any, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_killed_in_phase_3_resumes_without_redoing_phases(tmp_path: Path, dmipro_home: Path) -> None:
    spec = small_spec(
        num_trials=12,
        parallel_trials=1,
        lm={"model": "sim/math", "temperature": 0.0, "sim": {"latency_ms": 40}},
    )
    spec["executor"]["concurrency"] = 4
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(spec))
    job_id = "resume-me"
    env = {**os.environ, "DMIPRO_HOME": str(dmipro_home)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dmipro.cli", "optimize", str(job_file), "--job-id", job_id, "--json"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    store = JobStore()
    try:

        def in_search() -> bool:
            record = store.find(job_id)
            return bool(record and record.phase == "search" and record.progress.get("trials_done", 0) >= 3)

        _wait_for(in_search, 120, "phase 3 to be under way")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    killed = store.get(job_id)
    assert killed.state is JobState.RUNNING  # the process died without finishing the row
    assert killed.progress["trials_done"] < 12

    executor = RecordingExecutor(4)
    try:
        result = dmipro.optimize(job_file, job_id=job_id, executor=executor)
    finally:
        executor.close()
    assert result.stop_reason == "completed"
    assert result.trials == 12  # every trial counted exactly once across both attempts
    assert sum(1 for e in result.trial_logs.values() if e["kind"] == "minibatch") == 12
    assert result.phases["bootstrap"].resumed and result.phases["propose"].resumed
    assert set(executor.tasks) == {"evaluate_chunk"}  # no bootstrap, no proposal calls
    record = store.get(job_id)
    assert record.state is JobState.SUCCEEDED and record.attempts == 2
    assert json.loads(json.dumps(record.result))["best_score"] == result.best_score
