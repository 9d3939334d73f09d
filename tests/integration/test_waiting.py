"""A submitted job whose coordinator queue has no consumer says so, on Celery and on RQ.

Real Redis, real worker processes started with the ``dmipro worker`` command as a user
would: first only a work worker (the mistake), then a coordinator worker (the fix).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dmipro.config import reload_settings
from dmipro.jobs import JobState
from dmipro.jobs.submit import JobHandle, coordinator_consumers, submit
from tests.integration.conftest import small_job
from tests.test_cli_foundation import DMIPRO, REPO

REASON = "no worker consumes dmipro.coordinator"
BROKER_DB = {"celery": 6, "rq": 8}


def _until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def local_env(
    redis_server: str, request: pytest.FixtureRequest, dmipro_home: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, dict[str, str]]]:
    """This process and its workers on one machine: a SQLite job database, a private Redis db."""
    import redis

    backend = request.param
    db = BROKER_DB[backend]
    for n in (db, db + 1):
        redis.Redis.from_url(f"{redis_server}/{n}").flushdb()
    env = {
        "DMIPRO_BROKER_URL": f"{redis_server}/{db}",
        "DMIPRO_RESULT_BACKEND": f"{redis_server}/{db + 1}",
        "DMIPRO_ALLOW_SQLITE_REMOTE": "1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    reload_settings()
    full = dict(os.environ)
    full["PYTHONUNBUFFERED"] = "1"
    yield backend, full


class Workers:
    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.procs: list[subprocess.Popen[bytes]] = []
        self.files: list[Any] = []

    def start(self, *args: str) -> None:
        log = (self.logs / f"worker-{len(self.procs)}.log").open("w")
        self.files.append(log)
        self.procs.append(
            subprocess.Popen(
                [str(DMIPRO), "worker", *args], cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        )

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for log in self.files:
            log.close()


@pytest.fixture
def workers(local_env: tuple[str, dict[str, str]], tmp_path: Path) -> Iterator[Workers]:
    started = Workers(local_env[1], tmp_path)
    yield started
    started.stop()


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DMIPRO), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("local_env", ["rq", "celery"], indirect=True)
def test_a_job_nobody_consumes_says_why_until_a_coordinator_worker_starts(
    local_env: tuple[str, dict[str, str]], workers: Workers
) -> None:
    backend, env = local_env
    # The mistake: a worker on the work queue only (`dmipro worker rq` without flags does this).
    if backend == "rq":
        workers.start("rq")
    else:
        workers.start("celery", "--queues", "dmipro.work", "--concurrency", "4")
    handle = submit(small_job(), executor=backend)

    report = handle.status()
    assert report["state"] == "queued" and report["waiting"] == REASON

    status = _cli(env, "status", handle.job_id, "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["waiting"] == REASON
    text = _cli(env, "status", handle.job_id)
    assert f"{handle.job_id}: queued: {REASON}" in text.stdout

    waited = _cli(env, "wait", handle.job_id, "--timeout", "2", "--json")
    assert waited.returncode == 2 and REASON in waited.stderr
    assert waited.stdout == ""  # it timed out: nothing reported on stdout

    # The fix: a coordinator worker. The reason goes and the job runs to the end.
    if backend == "rq":
        workers.start("rq", "--queues", "dmipro.coordinator")
    else:
        workers.start("celery", "--queues", "dmipro.coordinator", "--concurrency", "1")
    _until(lambda: coordinator_consumers(backend) > 0, 60, "the coordinator worker to register")
    assert JobHandle(handle.job_id).wait(timeout=180)["state"] == JobState.SUCCEEDED.value
    assert handle.status()["waiting"] is None


def test_worker_rq_help_names_both_processes(dmipro_home: Path) -> None:
    out = subprocess.run(
        [str(DMIPRO), "worker", "rq", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    ).stdout
    assert "dmipro worker rq --queues dmipro.coordinator" in out
    assert "dmipro worker rq --queues dmipro.work" in out
