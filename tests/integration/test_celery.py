"""Celery: the app's configuration, and jobs submitted to real Celery workers."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import dspy
import pytest

from dmipro import tracing
from dmipro.config import reload_settings
from dmipro.errors import ConfigError, ExecutorError, OptimizationError, RefError
from dmipro.jobs import JobStore, load_job
from dmipro.jobs.submit import JobHandle, JobTimeoutError, cancel, check_database_for, status, submit, wait
from dmipro.tasks import task_names
from tests.contract.workers import Stack, wait_for
from tests.integration.conftest import small_job

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CARRIER = {"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"}


# -- configuration (no services needed) ----------------------------------------------------

def test_the_app_is_json_only_at_least_once_with_two_queues(monkeypatch: pytest.MonkeyPatch) -> None:
    from dmipro.workers.celery_app import make_app

    monkeypatch.setenv("DMIPRO_VISIBILITY_TIMEOUT", "42")
    reload_settings()
    conf = make_app("redis://127.0.0.1:1/0", "redis://127.0.0.1:1/1").conf
    assert conf.task_serializer == conf.result_serializer == "json"
    assert list(conf.accept_content) == list(conf.result_accept_content) == ["json"]
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] == 42
    assert conf.result_backend_transport_options["visibility_timeout"] == 42
    assert conf.task_track_started and conf.worker_send_task_events and conf.task_send_sent_event
    assert {q.name for q in conf.task_queues} == {"dmipro.coordinator", "dmipro.work"}
    assert conf.task_routes == {"dmipro.optimize": {"queue": "dmipro.coordinator"}}
    assert conf.task_default_queue == "dmipro.work"


def test_every_registry_task_is_a_celery_task_named_after_it() -> None:
    from dmipro.workers.celery_app import make_app

    app = make_app("redis://127.0.0.1:1/0", "redis://127.0.0.1:1/1")
    registered = {name for name in app.tasks if name.startswith("dmipro.")}
    assert registered == {f"dmipro.{name}" for name in task_names()} | {"dmipro.optimize"}
    assert {"dmipro.evaluate_chunk", "dmipro.bootstrap_demo_set", "dmipro.propose_instruction",
            "dmipro.optimize"} <= registered


def test_a_client_app_sends_by_name_and_registers_no_task_body() -> None:
    from dmipro.executor_adapters.celery import make_app as client_app

    app = client_app("redis://127.0.0.1:1/0", "redis://127.0.0.1:1/1")
    assert not {name for name in app.tasks if name.startswith("dmipro.")}
    assert app.conf.accept_content == ["json"] and app.conf.task_default_queue == "dmipro.work"


def test_a_bad_visibility_timeout_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from dmipro.workers.celery_app import make_app

    monkeypatch.setenv("DMIPRO_VISIBILITY_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="visibility_timeout.*DMIPRO_VISIBILITY_TIMEOUT"):
        reload_settings()
        make_app("redis://127.0.0.1:1/0", "redis://127.0.0.1:1/1")


def test_submit_refuses_sqlite_for_remote_workers() -> None:
    with pytest.raises(ConfigError, match="SQLite.*set DMIPRO_DATABASE_URL to a PostgreSQL URL"):
        submit(small_job(), executor="celery")
    assert JobStore().list() == []


def test_sqlite_is_allowed_when_forced_or_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    forced = small_job()
    forced["executor"] = {"backend": "celery", "concurrency": 4, "force_sqlite": True}
    check_database_for(load_job(forced), "celery")
    monkeypatch.setenv("DMIPRO_ALLOW_SQLITE_REMOTE", "1")
    from dmipro.config import reload_settings

    reload_settings()
    check_database_for(load_job(small_job()), "celery")


def test_submit_validates_the_job_before_writing_anything() -> None:
    bad = small_job()
    bad["metric"] = "os.path:join"
    with pytest.raises(RefError, match="not in DMIPRO_ALLOWED_MODULES"):
        submit(bad, executor="celery")
    with pytest.raises(ConfigError, match="executor must be one of celery, rq"):
        submit(small_job(), executor="thread")
    assert JobStore().list() == []


@pytest.mark.integration
def test_submit_checks_the_run_plan_before_writing_anything() -> None:
    with pytest.raises(OptimizationError, match="at least 2"):
        submit(small_job(val=1), executor="celery")
    assert JobStore().list() == []


def test_an_unreachable_broker_is_reported_before_the_job_is_written(monkeypatch: pytest.MonkeyPatch) -> None:
    from dmipro.config import reload_settings
    from tests.conftest import free_port

    monkeypatch.setenv("DMIPRO_ALLOW_SQLITE_REMOTE", "1")
    monkeypatch.setenv("DMIPRO_BROKER_URL", f"redis://127.0.0.1:{free_port()}/0")
    reload_settings()
    with pytest.raises(ExecutorError, match="cannot reach the celery broker"):
        submit(small_job(), executor="celery")
    assert JobStore().list() == []


# -- jobs on real workers ---------------------------------------------------------------

@pytest.mark.integration
def test_submit_wait_status_and_result(celery_stack: Stack) -> None:
    handle = submit(small_job(), executor="celery")
    first = handle.status()
    assert first["job_id"] == handle.job_id and first["state"] in {"queued", "running", "succeeded"}
    report = handle.wait(timeout=120)
    assert report["state"] == "succeeded", (report, celery_stack.logs())
    assert report["trials_done"] == report["trials_total"] == 4
    assert report["best_score"] >= report["baseline_score"]
    assert report["lm_calls"] > 0 and report["tokens"] > 0
    assert report["created_at"] <= report["started_at"] <= report["finished_at"]
    assert report["attempts"] == 1 and report["error"] is None
    assert status(handle.job_id) == report == wait(handle.job_id, timeout=1)

    program = handle.result()
    assert isinstance(program, dspy.Module)
    best = JobStore().get(handle.job_id).result["best_candidate"]["predict"]  # type: ignore[index]
    assert program.predict.signature.instructions == best["instruction"]
    # The saved file is plain DSPy JSON: a fresh program loads it with dspy alone.
    from examples.math_qa.program import build

    plain = build()
    plain.load(report["program_path"])
    assert plain.predict.signature.instructions == best["instruction"]
    assert JobHandle(handle.job_id).result().dump_state() == program.dump_state()


@pytest.mark.integration
def test_the_coordinator_reports_progress_as_task_state(celery_stack: Stack) -> None:
    from celery.result import AsyncResult

    from dmipro.executor_adapters.celery import coordinator_task_id, get_app

    handle = submit(small_job(latency_ms=20), executor="celery")
    result = AsyncResult(coordinator_task_id(handle.job_id), app=get_app())
    seen: list[dict[str, Any]] = []

    def progressed() -> bool:
        # One read of the backend: state and info read apart can straddle the end of the task.
        meta = result.backend.get_task_meta(result.id)
        if meta["status"] == "PROGRESS" and isinstance(meta["result"], dict):
            seen.append(meta["result"])
        return meta["status"] in {"SUCCESS", "FAILURE", "REVOKED"}

    wait_for(progressed, 120, "the coordinator task to finish", interval=0.02)
    assert result.state == "SUCCESS", celery_stack.logs()
    assert seen, "no PROGRESS state was observed"
    assert {p["phase"] for p in seen} <= {"bootstrap", "propose", "search"}
    assert any(p["phase"] == "search" and p.get("trials_total") == 4 for p in seen)
    assert all("lm_calls" in p and "tokens" in p for p in seen)
    summary = result.result
    assert summary["state"] == "succeeded" and summary["job_id"] == handle.job_id and summary["trials"] == 4


@pytest.mark.integration
def test_the_trace_context_reaches_the_worker(celery_stack: Stack) -> None:
    from dmipro.executor_adapters.celery import CeleryAdapter

    with CeleryAdapter(2) as ex, tracing.attach(CARRIER):
        where = ex.submit("contract.where", {}).result(timeout=30)
    assert TRACE_ID in where["trace"]["traceparent"]


@pytest.mark.integration
def test_closing_the_executor_fails_tasks_still_in_flight(celery_stack: Stack) -> None:
    from dmipro.executor_adapters.celery import CeleryAdapter

    ex = CeleryAdapter(2)
    fut = ex.submit("tests.echo", {"sleep": 3})
    ex.close()
    with pytest.raises(ExecutorError, match="closed before the task finished"):
        fut.result(timeout=10)


@pytest.mark.integration
def test_a_job_failing_on_the_worker_is_marked_failed(celery_stack: Stack) -> None:
    from dmipro.executor_adapters.celery import CeleryAdapter

    spec = load_job(small_job()).to_json()
    spec["metric"] = "tests.fixtures.broken:metric"  # written past validation: the module raises on import
    record = JobStore().create(name="broken", spec=spec, executor="celery")
    CeleryAdapter.enqueue_coordinator(record.id)
    report = wait(record.id, timeout=60)
    assert report["state"] == "failed"
    assert "this module cannot be imported" in report["error"]
    with pytest.raises(OptimizationError, match="is failed: .*cannot be imported"):
        JobHandle(record.id).result()


@pytest.mark.integration
def test_cancelling_a_running_job_stops_it_between_batches(celery_stack: Stack) -> None:
    handle = submit(small_job(latency_ms=30, num_trials=16, val=30), executor="celery")
    wait_for(lambda: handle.status()["phase"] == "search", 120, "the search phase")
    cancel(handle.job_id)
    report = handle.wait(timeout=120)
    assert report["state"] == "cancelled", (report, celery_stack.logs())
    assert report["stop_reason"] == "cancelled" and report["cancel_requested"]
    assert report["trials_done"] < 16


@pytest.mark.integration
def test_a_cancelled_queued_job_never_runs(celery_stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    from dmipro.config import reload_settings
    from dmipro.workers.optimize import run_coordinator

    # A broker database no worker listens on: the job stays queued.
    monkeypatch.setenv("DMIPRO_BROKER_URL", f"{celery_stack.redis_base}/15")
    reload_settings()
    handle = submit(small_job(), executor="celery")
    assert handle.status()["state"] == "queued"
    assert handle.cancel()["state"] == "cancelled"
    # Should the message be delivered anyway, the coordinator reports the job and runs nothing.
    summary = run_coordinator(json.dumps({"job_id": handle.job_id}), backend="celery")
    assert summary["state"] == "cancelled"
    assert JobStore().get(handle.job_id).attempts == 0


@pytest.mark.integration
def test_a_coordinator_delivered_twice_runs_the_job_once(celery_stack: Stack) -> None:
    from celery.result import AsyncResult

    from dmipro.executor_adapters.celery import OPTIMIZE_TASK, get_app

    handle = submit(small_job(latency_ms=10), executor="celery")
    body = json.dumps({"job_id": handle.job_id, "executor": "celery"})
    duplicate = get_app().send_task(OPTIMIZE_TASK, args=[body], task_id=f"dup-{uuid.uuid4().hex}")
    report = handle.wait(timeout=120)
    assert report["state"] == "succeeded", celery_stack.logs()
    second = AsyncResult(duplicate.id, app=get_app())
    wait_for(second.ready, 60, "the duplicate coordinator to report")
    assert second.result["best_score"] == report["best_score"]
    record = JobStore().get(handle.job_id)
    assert record.attempts == 1
    assert len([t for t in record.result["trial_logs"].values() if not t["full_eval"]]) == 4  # type: ignore[index]


@pytest.mark.integration
def test_wait_times_out_with_a_clear_error(celery_stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    from dmipro.config import reload_settings

    monkeypatch.setenv("DMIPRO_BROKER_URL", f"{celery_stack.redis_base}/15")
    reload_settings()
    handle = submit(small_job(), executor="celery")
    start = time.monotonic()
    with pytest.raises(JobTimeoutError, match=f"job {handle.job_id} is still queued"):
        handle.wait(timeout=0.3)
    assert time.monotonic() - start < 5
    handle.cancel()


@pytest.mark.integration
def test_a_task_the_broker_lost_is_sent_again(celery_stack: Stack) -> None:
    import redis

    from dmipro.executor_adapters.celery import CeleryAdapter

    queue = f"dmipro.test-{uuid.uuid4().hex[:6]}"  # no worker consumes it
    client = redis.Redis.from_url(celery_stack.envs["celery"]["DMIPRO_BROKER_URL"])
    with CeleryAdapter(2, queue=queue) as ex:
        ex.lost_after_s = 0.5
        fut = ex.submit("tests.echo", {"n": 5})
        wait_for(lambda: client.llen(queue) == 1, 10, "the task to be queued")
        client.delete(queue)  # what a worker killed between BRPOP and its bookkeeping leaves behind
        wait_for(lambda: client.llen(queue) == 1, 10, "the lost task to be sent again")
        client.rpoplpush(queue, "dmipro.work")  # hand it to the shared worker
        assert fut.result(timeout=30) == {"echo": {"n": 5}}
    client.close()
