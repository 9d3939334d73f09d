"""Finding 8: a stuck task cannot hold a job forever; cancel stops tasks in flight; a dead coordinator shows.

Real Celery workers (prefork, so Celery's time limits can stop a task) and a metric that never returns.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from dmipro.config import reload_settings
from dmipro.jobs import JobStore, load_job
from dmipro.jobs.store import JobState
from dmipro.jobs.submit import JobHandle, status, submit
from tests.contract.workers import (
    WorkerProcess,
    backend_env,
    base_env,
    celery_worker,
    create_database,
    drop_database,
    flush,
    wait_for,
)
from tests.integration.conftest import small_job

pytestmark = pytest.mark.integration

DB = 5  # Redis databases 5 (broker) and 6 (results)


@pytest.fixture(scope="module")
def prefork_worker(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[dict[str, str], WorkerProcess]]:
    redis_base = request.getfixturevalue("redis_server")
    server = request.getfixturevalue("postgres_server_url")
    url, name = create_database(server)
    home = tmp_path_factory.mktemp("deadline-worker")
    flush(redis_base, DB, DB + 1)
    env = base_env(url, home, **backend_env(redis_base, "celery", DB))
    worker = celery_worker(env, home, queues="dmipro.coordinator,dmipro.work", concurrency=3, tag="deadline")
    worker.argv[worker.argv.index("threads")] = "prefork"
    worker.start().wait_ready()
    try:
        yield env, worker
    finally:
        worker.stop()
        drop_database(server, name)


@pytest.fixture
def stack(prefork_worker: tuple[dict[str, str], WorkerProcess],
          monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, str], WorkerProcess]:
    env, _ = prefork_worker
    for key in ("DMIPRO_DATABASE_URL", "DMIPRO_BROKER_URL", "DMIPRO_RESULT_BACKEND"):
        monkeypatch.setenv(key, env[key])
    reload_settings()
    return prefork_worker


def _stuck_job(deadline_s: float | None) -> dict[str, Any]:
    job = small_job()
    job["metric"] = "tests.fixtures.metrics:never_returns"
    if deadline_s is not None:
        job["lm"] = {**job["lm"], "retry": {"deadline_s": deadline_s}}
    job["executor"] = {"backend": "celery", "concurrency": 2, "chunk_size": 2}
    return job


def test_f08_a_metric_that_never_returns_ends_the_job_and_cancel_stops_tasks_in_flight(
    stack: tuple[dict[str, str], WorkerProcess]
) -> None:
    _, worker = stack
    # With the default LM deadline (600 s) the stuck tasks would hold the job for 20 minutes:
    # cancel stops them now.
    handle = submit(_stuck_job(None), executor="celery")
    wait_for(lambda: handle.status()["state"] == "running" and handle.status()["phase"], 60, "the job to run")
    time.sleep(2)  # its first tasks are stuck in the metric by now
    handle.cancel()
    report = handle.wait(timeout=30)
    assert report["state"] == "cancelled", report
    assert worker.alive, worker.log_tail()

    # An LM deadline of 1 s on a one-predictor program: an evaluation chunk of 2 examples may run
    # 2 s, a demo set over the 20 training examples 20 s; then the task is revoked and the job fails.
    handle = submit(_stuck_job(1.0), executor="celery")
    began = time.monotonic()
    report = handle.wait(timeout=120)
    assert report["state"] == "failed", report
    assert "deadline" in report["error"] or "TimeLimitExceeded" in report["error"], report["error"]
    assert time.monotonic() - began < 90
    assert worker.alive, worker.log_tail()

    # The worker's slots are free again: a sound job runs to the end.
    good = submit({**small_job(), "executor": {"backend": "celery", "concurrency": 2}}, executor="celery")
    assert good.wait(timeout=120)["state"] == "succeeded", worker.log_tail()


def test_f08_a_job_whose_coordinator_died_shows_as_stale_with_its_heartbeat_age(
    stack: tuple[dict[str, str], WorkerProcess]
) -> None:
    store = JobStore()
    record = store.create(name="orphan", spec=load_job(small_job()).to_json(), executor="celery")
    store.start(record.id, "celery")
    assert status(record.id)["state"] == "running"
    with store.engine.begin() as conn:  # its coordinator's last sign of life, 10 minutes ago
        conn.execute(sa.text("UPDATE dmipro_jobs SET updated_at = :t WHERE id = :id"),
                     {"t": time.time() - 600, "id": record.id})
    report = status(record.id)
    assert report["state"] == "stale" and report["heartbeat_age_s"] >= 600
    with store.heartbeat(record.id, every=0.1):  # what a live coordinator does
        wait_for(lambda: status(record.id)["state"] == "running", 10, "a heartbeat to show the job alive")
    with store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE dmipro_jobs SET updated_at = :t WHERE id = :id"),
                     {"t": time.time() - 600, "id": record.id})
    cancelled = JobHandle(record.id).cancel()
    assert store.get(record.id).state is JobState.CANCELLED, cancelled
