"""Fuzzed task payloads and results: a worker answers every body with a result or a DmiproError,
and the executors decode whatever a worker or a broker hands back into an outcome or a DmiproError."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from dmipro.errors import DmiproError
from dmipro.executor_adapters import InlineAdapter
from dmipro.tasks import execute
from tests.fuzz.strategies import FUZZ, JSON, ODD_STRINGS, mutated
from tests.fuzz.test_fuzz_job_specs import BASE

SETTINGS = FUZZ.__class__(
    FUZZ, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


class Recording(InlineAdapter):
    """Runs tasks inline and keeps every payload it shipped, by task."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: dict[str, list[str]] = {}

    def _ship(self, task: str, body: str) -> Any:
        self.bodies.setdefault(task, []).append(body)
        return super()._ship(task, body)


@pytest.fixture(scope="module")
def real_payloads(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, dict[str, Any]]]:
    """One real payload per task, from a tiny job run inline (its runtime stays cached here)."""
    from dmipro.config import reload_settings
    from dmipro.jobs import JobStore, load_job
    from dmipro.teleprompt.mipro import run_job

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DMIPRO_HOME", str(tmp_path_factory.mktemp("fuzz-home")))
        mp.setenv("DMIPRO_ALLOWED_MODULES", "examples,tests")
        reload_settings()
        job = load_job(BASE)
        record = JobStore().create(name="fuzz", spec=job.to_json(), executor="inline")
        ex = Recording()
        run_job(record.id, executor=ex)
        yield {task: json.loads(bodies[0]) for task, bodies in ex.bodies.items()}
    reload_settings()


def answers(task: str, body: str) -> None:
    """The worker's side: a JSON result, or a DmiproError with a message."""
    try:
        result = execute(task, body)
    except DmiproError as exc:
        assert str(exc).strip()
        return
    json.dumps(result, allow_nan=False)


TASKS = [
    "evaluate_chunk",
    "bootstrap_demo_set",
    "propose_instruction",
    "describe_data",
    "summarize_data",
    "describe_program",
    "describe_module",
]


@SETTINGS
@given(
    task=st.sampled_from(TASKS),
    body=st.text(max_size=80)
    | JSON.map(json.dumps)
    | st.sampled_from(["[" * 5000, '{"a":' * 3000, '"\\ud800"', "1e999999", '{"job": NaN}']),
)
def test_any_body_gets_a_result_or_a_clear_error(task: str, body: str) -> None:
    answers(task, body)


@SETTINGS
@given(data=st.data())
def test_a_mutated_real_payload_gets_a_result_or_a_clear_error(
    real_payloads: dict[str, dict[str, Any]], data: st.DataObject
) -> None:
    task = data.draw(st.sampled_from(sorted(real_payloads)))
    payload = data.draw(mutated(real_payloads[task], max_mutations=2))
    answers(task, json.dumps(payload))


@SETTINGS
@given(
    body=st.text(max_size=60) | JSON.map(json.dumps) | st.sampled_from(["[" * 5000, '{"job_id": "\\u0000"}'])
)
def test_a_coordinator_body_gets_a_summary_or_a_clear_error(body: str) -> None:
    from dmipro.workers.optimize import run_coordinator

    try:
        run_coordinator(body, backend="inline")
    except DmiproError as exc:
        assert str(exc).strip()


# -- what comes back from a worker ---------------------------------------------------------


@SETTINGS
@given(
    type_name=ODD_STRINGS
    | st.sampled_from(
        [
            "JobSpecError",
            "RefError",
            "TaskError",
            "LMError",
            "RateLimitError",
            "DatasetError",
            "JobTimeoutError",
            "DmiproError",
            "__class__",
            "errors",
        ]
    )
    | st.text(max_size=10),
    message=st.text(max_size=60) | ODD_STRINGS,
)
def test_a_remote_error_decodes_to_a_dmipro_error(type_name: str, message: str) -> None:
    from dmipro.executor_adapters._remote import remote_error

    assert isinstance(remote_error("evaluate_chunk", {"type": type_name, "message": message}), DmiproError)


@SETTINGS
@given(
    meta=JSON
    | st.fixed_dictionaries(
        {
            "status": st.sampled_from(["SUCCESS", "FAILURE", "REVOKED", "PENDING", "STARTED", "PROGRESS"]),
            "result": JSON,
        }
    )
)
def test_a_celery_result_decodes_to_an_outcome(meta: Any) -> None:
    from dmipro.executor_adapters.celery import _outcome

    outcome = _outcome("evaluate_chunk", meta)
    if outcome is not None:
        assert (outcome.result is None) != (outcome.error is None)
        if outcome.result is not None:
            assert isinstance(outcome.result, dict)
        else:
            assert isinstance(outcome.error, DmiproError)


class _FakeRQJob:
    """What the RQ executor reads of a failed RQ job: its meta and its latest result."""

    def __init__(self, meta: Any, exc_string: Any) -> None:
        self.meta = meta
        self._exc = exc_string

    def latest_result(self) -> Any:
        return type("Result", (), {"exc_string": self._exc})()


@SETTINGS
@given(meta=JSON, exc_string=st.none() | st.text(max_size=80) | ODD_STRINGS)
def test_a_failed_rq_job_decodes_to_a_dmipro_error(meta: Any, exc_string: Any) -> None:
    from dmipro.executor_adapters.rq import _failure

    assert isinstance(_failure("evaluate_chunk", _FakeRQJob(meta, exc_string)), DmiproError)
