"""Flower, started against the test Redis, shows the workers, the tasks and the coordinator's progress."""

from __future__ import annotations

import ast
import json
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from dmipro.api import evaluate
from dmipro.errors import DmiproError
from dmipro.jobs.submit import submit
from dmipro.workers.celery_app import FLOWER_TASK_COLUMNS
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


FLOWER_COMMANDS = {
    "celery": ["-m", "celery", "-A", "dmipro.workers.celery_app", "flower", "--address=127.0.0.1"],
    "dmipro": ["-m", "dmipro.cli", "flower", "--address", "127.0.0.1"],
}
"""Flower started the two ways an operator would: Celery's own command, and ``dmipro flower``."""


@contextmanager
def running_flower(stack: Stack, tmp_path: Path, how: str) -> Iterator[Flower]:
    port = free_port()
    env = dict(stack.envs["celery"], FLOWER_UNAUTHENTICATED_API="true")
    env.pop("FLOWER_TASKS_COLUMNS", None)
    log = (tmp_path / "flower.log").open("wb")
    port_arg = [f"--port={port}"] if how == "celery" else ["--port", str(port)]
    proc = subprocess.Popen(
        [sys.executable, *FLOWER_COMMANDS[how], *port_arg],
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


@pytest.fixture
def flower(celery_stack: Stack, tmp_path: Path) -> Iterator[Flower]:
    with running_flower(celery_stack, tmp_path, "dmipro") as client:
        yield client


def _task_columns(flower: Flower) -> list[str]:
    return re.findall(r'<th data-column="([a-z_]+)"', flower.get("/tasks"))


def _result(task: dict[str, Any]) -> dict[str, Any]:
    """A task's result as Flower's API gives it (a repr of the returned dict)."""
    value = task.get("result")
    return value if isinstance(value, dict) else ast.literal_eval(value)


def test_celery_flower_lists_the_workers_with_job_columns(celery_stack: Stack, tmp_path: Path) -> None:
    worker = celery_stack.workers["celery"][0].name
    with running_flower(celery_stack, tmp_path, "celery") as flower:
        wait_for(lambda: any(worker in k for k in flower.get("/api/workers?refresh=1")), 30,
                 "flower to list the worker")
        assert _task_columns(flower) == FLOWER_TASK_COLUMNS.split(",")


def test_an_evaluation_with_errored_examples_shows_them_in_flower(flower: Flower,
                                                                  celery_stack: Stack) -> None:
    job = small_job()
    # Half the LM calls fail and none is retried: some examples end errored, not scored.
    job["lm"]["sim"] = {"server_error_rate": 0.5, "seed": 3}
    job["lm"]["retry"] = {"max_attempts": 1}
    with pytest.raises(DmiproError):  # the evaluation cannot complete
        evaluate(job, executor="celery")

    def errored() -> list[dict[str, Any]] | None:
        chunks = [t for t in flower.get("/api/tasks?taskname=dmipro.evaluate_chunk").values()
                  if t["state"] == "SUCCESS"]
        hit = [t for t in chunks if _result(t)["errored"] > 0]
        return hit or None

    for task in wait_for(errored, 30, "flower to show an evaluation with errored examples"):
        # The counts come first, so the result column shows them before the per-example list.
        assert str(task["result"]).startswith("{'errored': ")
        assert _result(task)["errored"] == sum(1 for r in _result(task)["results"] if r.get("lm_error"))


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
    progress: list[dict[str, Any]] = []
    while not handle.record.state.finished:  # read the API while the job runs
        task = flower.get("/api/tasks?taskname=dmipro.optimize").get(optimize_id)
        if task:
            event_states.add(task["state"])
            if task["state"] == "PROGRESS":  # what the task list's state and result columns show
                progress.append(_result(task))
        result_states.add(flower.get(f"/api/task/result/{optimize_id}")["state"])
    assert handle.wait(timeout=60)["state"] == "succeeded"
    assert "PROGRESS" in event_states, event_states  # the task list followed the coordinator live
    # The coordinator's live state carries the job's phase, trials done of total and LM use.
    assert "PROGRESS" in result_states, result_states
    search = [p for p in progress if p["phase"] == "search"]
    assert search and all(p["trials_total"] == 4 and {"trials_done", "best_score", "lm_calls", "lm_errors",
                                                       "cost_usd"} <= set(p) for p in search), progress
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
    # ... and names its job in its id; the task list shows the job's columns.
    assert all(t["uuid"].startswith(f"{handle.job_id}-{t['name'].removeprefix('dmipro.')}-") for t in work)
    assert _task_columns(flower) == FLOWER_TASK_COLUMNS.split(",")
    assert all(_result(t)["errored"] == 0 for t in work if t["name"] == "dmipro.evaluate_chunk")
    assert f"job_id={handle.job_id}" in tasks[optimize_id]["args"]
