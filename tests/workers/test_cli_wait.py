"""`dmipro wait` on a terminal shows a live progress line on stderr; under --json, nothing but the report."""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from pathlib import Path

from dmipro.jobs import JobState, JobStore
from tests.test_cli_foundation import DMIPRO, REPO, _env


def _wait_on_a_terminal(home: Path, job_id: str, *flags: str) -> tuple[int, str, str]:
    """Run ``dmipro wait`` with stderr on a pseudo-terminal while this test moves the job along."""
    master, slave = os.openpty()
    proc = subprocess.Popen([str(DMIPRO), "wait", job_id, "--timeout", "60", *flags], cwd=REPO,
                            env=_env(home), stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    store = JobStore()
    err = b""
    poller = select.poll()
    poller.register(master, select.POLLIN)

    def drain(seconds: float) -> None:
        nonlocal err
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if poller.poll(50):  # poll, not select: a long test process may hold more than 1024 fds
                try:
                    err += os.read(master, 4096)
                except OSError:  # the child closed the terminal
                    return

    drain(1.5)
    store.start(job_id, "thread")
    for done in (1, 2, 3):
        store.set_progress(job_id, phase="search", trials_done=done, trials_total=4, best_score=50.0 + done)
        drain(1.0)
    store.finish(job_id, JobState.SUCCEEDED, result={"best_score": 53.0, "trials": 4})
    out, _ = proc.communicate(timeout=60)
    drain(0.5)
    os.close(master)
    return proc.returncode, out, err.decode(errors="replace")


def test_wait_shows_live_progress_on_a_terminal(dmipro_home: Path) -> None:
    job_id = JobStore().create(name="live", spec={"name": "live"}, executor="thread").id
    code, out, err = _wait_on_a_terminal(dmipro_home, job_id)
    assert code == 0, (out, err)
    for done in (1, 2, 3):  # each step of the job appeared on the line as it happened
        assert f"trials {done}/4" in err, err
    assert "\r" in err  # one line, rewritten in place
    assert out.startswith(f"{job_id}: succeeded, phase done"), out


def test_wait_json_prints_the_report_and_nothing_else(dmipro_home: Path) -> None:
    job_id = JobStore().create(name="quiet", spec={"name": "quiet"}, executor="thread").id
    code, out, err = _wait_on_a_terminal(dmipro_home, job_id, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["state"] == "succeeded" and report["phase"] == "done"
    assert "trials" not in err, err
