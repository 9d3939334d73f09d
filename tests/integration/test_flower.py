"""Flower, started against the test Redis, shows the workers, the tasks and the coordinator's progress."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dmipro.jobs.submit import submit
from tests.conftest import free_port
from tests.contract.workers import REPO, Stack, wait_for
from tests.integration.conftest import small_job

pytestmark = pytest.mark.integration


class Flower:
    def __init__(self, base: str) -> None:
        self.base = base

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.base + path, timeout=10) as response:
            body = response.read().decode()
        return json.loads(body) if body.strip()[:1] in "[{" else body

    def up(self) -> bool:
        try:
            return self.get("/healthcheck") == "OK"
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False


@pytest.fixture
def flower(celery_stack: Stack, tmp_path: Path) -> Iterator[Flower]:
    port = free_port()
    env = dict(celery_stack.envs["celery"], FLOWER_UNAUTHENTICATED_API="true")
    log = (tmp_path / "flower.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "dmipro.workers.celery_app", "flower", f"--port={port}",
         "--address=127.0.0.1"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    log.close()
    client = Flower(f"http://127.0.0.1:{port}")
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"flower exited:\n{(tmp_path / 'flower.log').read_text()}")
            return client.up()

        wait_for(ready, 60, "flower to answer /healthcheck", interval=0.2)
        yield client
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_flower_shows_workers_tasks_and_progress(flower: Flower, celery_stack: Stack) -> None:
    from dmipro.executor_adapters.celery import coordinator_task_id

    worker = celery_stack.workers["celery"][0].name
    workers = wait_for(lambda: {k: v for k, v in flower.get("/api/workers?refresh=1").items() if worker in k},
                       30, "flower to list the worker")
    (name, info), = workers.items()
    assert {q["name"] for q in info["active_queues"]} == {"dmipro.coordinator", "dmipro.work"}

    handle = submit(small_job(latency_ms=30), executor="celery")
    optimize_id = coordinator_task_id(handle.job_id)
    event_states: set[str] = set()
    result_states: set[str] = set()
    while not handle.record.state.finished:  # read the API while the job runs
        task = flower.get("/api/tasks?taskname=dmipro.optimize").get(optimize_id)
        if task:
            event_states.add(task["state"])
        result_states.add(flower.get(f"/api/task/result/{optimize_id}")["state"])
    assert handle.wait(timeout=60)["state"] == "succeeded"
    assert "STARTED" in event_states, event_states
    # The coordinator's progress is its task state (the meta is tested in test_celery.py).
    assert "PROGRESS" in result_states, result_states
    # The job row is finished a moment before the task's return value reaches the result backend.
    final = wait_for(lambda: (r := flower.get(f"/api/task/result/{optimize_id}"))["state"] == "SUCCESS" and r,
                     30, "the coordinator's result in the backend")
    assert final["result"]["job_id"] == handle.job_id

    def seen_all() -> dict[str, Any] | None:
        tasks = flower.get("/api/tasks")
        optimize = tasks.get(optimize_id)
        return tasks if optimize and optimize["state"] == "SUCCESS" else None

    tasks = wait_for(seen_all, 30, "flower to see the coordinator succeed")
    names = {t["name"] for t in tasks.values()}
    assert {"dmipro.optimize", "dmipro.evaluate_chunk", "dmipro.bootstrap_demo_set",
            "dmipro.propose_instruction"} <= names
    assert tasks[optimize_id]["worker"] == name
    assert all(t["state"] == "SUCCESS" for t in tasks.values() if t["name"] == "dmipro.evaluate_chunk")
    # Every work task of the job links to its coordinator, so Flower shows them as one tree.
    work = [t for t in tasks.values() if t["name"] != "dmipro.optimize"]
    assert work and all(t["parent_id"] == t["root_id"] == optimize_id for t in work), \
        {t["uuid"]: (t["parent_id"], t["root_id"]) for t in work}
    assert f"job_id={handle.job_id}" in tasks[optimize_id]["args"]
