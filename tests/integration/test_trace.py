"""A Celery run is one trace: the coordinator's spans and the work worker's spans link up."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dmipro.config import reload_settings
from dmipro.jobs.submit import submit
from dmipro.observability import read_span_file
from tests.contract.workers import backend_env, base_env, celery_worker, create_database, drop_database, flush
from tests.integration.conftest import small_job

pytestmark = pytest.mark.integration

TRACE_DB = 8
"""Redis databases of this module's workers: broker 8, results 9."""


@pytest.fixture(scope="module")
def traced_workers(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict]:
    """A coordinator worker and a work worker, each writing its spans to its own file."""
    redis_base = request.getfixturevalue("redis_server")
    server = request.getfixturevalue("postgres_server_url")
    url, name = create_database(server)
    home = tmp_path_factory.mktemp("traced")
    flush(redis_base, TRACE_DB, TRACE_DB + 1)
    logs = home / "logs"
    logs.mkdir()
    env = base_env(url, home, **backend_env(redis_base, "celery", TRACE_DB))
    files = {role: home / f"spans-{role}.jsonl" for role in ("coordinator", "work")}
    workers = []
    for role, queue, slots in (("coordinator", "dmipro.coordinator", 2), ("work", "dmipro.work", 4)):
        worker_env = {
            **env,
            "DMIPRO_SUBSCRIBERS": "otel",
            "DMIPRO_OTEL_EXPORT_FILE": str(files[role]),
            "OTEL_TRACES_EXPORTER": "none",
            "OTEL_METRICS_EXPORTER": "none",
        }
        workers.append(celery_worker(worker_env, logs, queues=queue, concurrency=slots, tag=f"trace-{role}"))
    for w in workers:
        w.start()
    try:
        for w in workers:
            w.wait_ready()
        yield {"env": env, "files": files, "workers": workers}
    finally:
        for w in workers:
            w.stop()  # a clean stop flushes the span exporters
        drop_database(server, name)


def test_a_celery_run_is_one_trace_with_correct_parent_links(
    traced_workers: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = traced_workers["env"]
    for key in ("DMIPRO_DATABASE_URL", "DMIPRO_BROKER_URL", "DMIPRO_RESULT_BACKEND"):
        monkeypatch.setenv(key, env[key])
    reload_settings()
    handle = submit(small_job(num_trials=3), executor="celery")
    report = handle.wait(timeout=180)
    assert report["state"] == "succeeded", report
    for w in traced_workers["workers"]:
        w.stop()

    coordinator = read_span_file(str(traced_workers["files"]["coordinator"]))
    work = read_span_file(str(traced_workers["files"]["work"]))
    ours = [s for s in coordinator + work if s["name"].startswith(("dmipro.", "chat "))]
    (root,) = [s for s in coordinator if s["name"] == "dmipro.optimize"]
    assert root["attributes"]["dmipro.job_id"] == handle.job_id
    assert {s["trace_id"] for s in ours} == {root["trace_id"]}, "the run is split over several traces"

    coordinator_ids = {s["span_id"]: s for s in coordinator}
    work_ids = {s["span_id"]: s for s in work}
    tasks = [s for s in work if s["name"].startswith("dmipro.task.")]
    assert {s["name"] for s in tasks} >= {
        "dmipro.task.evaluate_chunk",
        "dmipro.task.bootstrap_demo_set",
        "dmipro.task.propose_instruction",
    }
    for task in tasks:
        # A work task's parent is the coordinator span that shipped it, in the other process.
        parent = coordinator_ids.get(task["parent_span_id"])
        assert parent is not None, f"{task['name']} has no parent in the coordinator's spans"
        assert parent["name"] in {"dmipro.evaluate", "dmipro.phase.bootstrap", "dmipro.phase.propose"}
        assert parent["pid"] != task["pid"]
    lm_calls = [s for s in work if s["name"].startswith("chat ")]
    assert lm_calls and all(
        work_ids[s["parent_span_id"]]["name"].startswith("dmipro.task.") for s in lm_calls
    )
    tokens = sum(
        s["attributes"]["gen_ai.usage.input_tokens"] + s["attributes"]["gen_ai.usage.output_tokens"]
        for s in lm_calls
    )
    assert tokens == report["tokens"]
