"""Finding 2: a job must not pick a worker's secret as its key, nor send a worker's keys to its own host.

A real Celery worker holding planted secrets, a real HTTP endpoint recording what it receives.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dmipro.config import reload_settings
from dmipro.errors import JobSpecError
from dmipro.jobs import JobStore, load_job
from dmipro.jobs.submit import JobHandle, submit
from tests.contract.workers import backend_env, base_env, celery_worker, create_database, drop_database, flush
from tests.integration.conftest import small_job
from tests.security._recorder import RecordingServer, recording_server

pytestmark = pytest.mark.integration

PLANTED = "sk-planted-provider-key-0123456789"
DB = 7  # Redis databases 7 (broker) and 8 (results) of the session's server


@pytest.fixture(scope="module")
def endpoint() -> Iterator[RecordingServer]:
    with recording_server() as server:
        yield server


@pytest.fixture(scope="module")
def keyed_worker(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                 endpoint: RecordingServer) -> Iterator[dict[str, str]]:
    """A Celery worker whose environment holds a provider key and the job database URL."""
    redis_base = request.getfixturevalue("redis_server")
    server = request.getfixturevalue("postgres_server_url")
    url, name = create_database(server)
    home = tmp_path_factory.mktemp("keyed-worker")
    flush(redis_base, DB, DB + 1)
    env = base_env(url, home, OPENAI_API_KEY=PLANTED, DMIPRO_ALLOWED_API_HOSTS=f"127.0.0.1:{endpoint.port}",
                   **backend_env(redis_base, "celery", DB))
    worker = celery_worker(env, home, queues="dmipro.coordinator,dmipro.work", concurrency=4, tag="keyed")
    worker.start().wait_ready()
    try:
        yield env
    finally:
        worker.stop()
        drop_database(server, name)


def _point_at(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("DMIPRO_DATABASE_URL", "DMIPRO_BROKER_URL", "DMIPRO_RESULT_BACKEND"):
        monkeypatch.setenv(key, env[key])
    reload_settings()


def _hostile_run(lm: dict[str, Any]) -> dict[str, Any]:
    """Write a job row as a tampered client would (no submit-side checks) and send its coordinator."""
    from dmipro.executor_adapters.celery import CeleryAdapter

    spec = load_job(small_job()).to_json()
    spec["lm"] = lm
    record = JobStore().create(name="hostile-lm", spec=spec, executor="celery")
    CeleryAdapter.enqueue_coordinator(record.id)
    return JobHandle(record.id).wait(timeout=120)


def test_f02_workers_send_no_secret_of_theirs_to_a_job_chosen_endpoint(
    keyed_worker: dict[str, str], endpoint: RecordingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    _point_at(keyed_worker, monkeypatch)
    allowed = f"http://127.0.0.1:{endpoint.port}/v1"
    elsewhere = f"http://localhost:{endpoint.port}/v1"  # same server, a host the operator did not allow

    # The submitter's own checks refuse both attacks before anything is written.
    monkeypatch.setenv("DMIPRO_ALLOWED_API_HOSTS", f"127.0.0.1:{endpoint.port}")
    reload_settings()
    key_refused = r"lm\.api_key_env: .*DMIPRO_DATABASE_URL.*DMIPRO_ALLOWED_KEY_ENVS"
    with pytest.raises(JobSpecError, match=key_refused):
        submit({**small_job(), "lm": {"model": "openai/sim-math", "api_base": allowed,
                                      "api_key_env": "DMIPRO_DATABASE_URL"}}, executor="celery")
    with pytest.raises(JobSpecError, match=r"lm\.api_base: .*'localhost'.*DMIPRO_ALLOWED_API_HOSTS"):
        submit({**small_job(), "lm": {"model": "openai/sim-math", "api_base": elsewhere}}, executor="celery")
    assert JobStore().list() == []

    # A tampered client skips those checks: the worker applies its own rules.
    stolen = _hostile_run({"model": "openai/sim-math", "api_base": allowed,
                           "api_key_env": "DMIPRO_DATABASE_URL"})
    assert stolen["state"] == "failed" and "DMIPRO_ALLOWED_KEY_ENVS" in stolen["error"]
    implicit = _hostile_run({"model": "openai/sim-math", "api_base": elsewhere})
    assert implicit["state"] == "failed" and "DMIPRO_ALLOWED_API_HOSTS" in implicit["error"]
    assert endpoint.seen() == [], "a refused job reached the endpoint"

    # An endpoint the operator allowed gets the job's calls, with no key of the worker's.
    ok = _hostile_run({"model": "openai/sim-math", "api_base": allowed, "temperature": 0.0, "cache": False})
    assert ok["state"] == "succeeded", ok
    seen = endpoint.seen()
    assert len(seen) > 10
    secrets = (PLANTED, keyed_worker["DMIPRO_DATABASE_URL"])
    leaked = [h for h in seen if any(s in v for s in secrets for v in h.values())]
    assert leaked == []
    assert {h.get("authorization") for h in seen} == {"Bearer dmipro-no-key"}


def test_f02_in_process_runs_send_no_implicit_provider_key(monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    import dmipro

    monkeypatch.setenv("OPENAI_API_KEY", PLANTED)
    with recording_server() as endpoint:
        job = {**small_job(), "executor": {"backend": "thread", "concurrency": 4},
               "lm": {"model": "openai/sim-math", "api_base": endpoint.url, "cache": False}}
        dmipro.evaluate(job)
        seen = endpoint.seen()
    assert seen and all(PLANTED not in v for h in seen for v in h.values())
