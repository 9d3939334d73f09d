"""The task registry: names to task bodies, JSON in and out, errors that say where they came from."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

import dmipro.tasks as tasks
from dmipro.errors import DecodeError, JobNotFoundError, RefError, TaskError
from dmipro.jobs import forget_runtime, load_job, register_runtime
from dmipro.tasks import execute, get_task, task, task_names
from tests.fixtures import tasks as fixture_tasks
from tests.fixtures.jobs import math_job, records

DEV = records("dev", 6)


def test_the_built_in_tasks_are_registered_by_importing_the_package() -> None:
    assert {"evaluate_chunk", "bootstrap_demo_set", "propose_instruction"} <= set(task_names())
    assert "optimize" not in task_names()  # the coordinator runs only on a worker holding the job's lease
    assert list(task_names()) == sorted(task_names())
    assert set(tasks.__all__) == {"execute", "get_task", "task", "task_names"}


def test_register_and_look_up() -> None:
    name = f"tests.double.{uuid.uuid4().hex[:6]}"

    @task(name)
    def double(payload: dict[str, Any]) -> dict[str, Any]:
        return {"value": payload["value"] * 2}

    assert get_task(name) is double and name in task_names()
    assert task(name)(double) is double  # registering the same body again is harmless
    assert execute(name, '{"value": 21}') == {"value": 42}


def test_a_name_cannot_be_taken_twice() -> None:
    with pytest.raises(ValueError, match="'tests.echo' is already registered"):
        task("tests.echo")(lambda payload: payload)
    assert get_task("tests.echo") is fixture_tasks.echo


def test_unknown_task_names_are_task_errors() -> None:
    with pytest.raises(TaskError, match="unknown task 'nope'") as info:
        get_task("nope")
    assert (info.value.task, info.value.error_type) == ("nope", "KeyError")
    with pytest.raises(TaskError, match="unknown task"):
        execute("nope", "{}")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("{not json", "payload is not JSON"),
        ("[1, 2]", "payload must be a JSON object"),
        ('"text"', "payload must be a JSON object"),
    ],
)
def test_bodies_that_are_not_json_objects_are_decode_errors(body: str, message: str) -> None:
    fixture_tasks.CALLS.clear()
    with pytest.raises(DecodeError, match=message):
        execute("tests.record", body)
    assert fixture_tasks.CALLS == []


def test_task_exceptions_become_task_errors_with_the_original_type() -> None:
    with pytest.raises(TaskError, match="ValueError: task failed on 7") as info:
        execute("tests.fail", '{"n": 7}')
    assert (info.value.task, info.value.error_type) == ("tests.fail", "ValueError")
    assert isinstance(info.value.__cause__, ValueError)


def test_dmipro_errors_pass_through() -> None:
    with pytest.raises(RefError) as info:
        execute("tests.refuse", "{}")
    assert info.value.field == "program"


def test_results_come_back_as_plain_json() -> None:
    assert execute("tests.tuple_result", "{}") == {"pair": [1, 2], "nested": {"t": ["a"]}}
    with pytest.raises(DecodeError, match="result is not JSON-serializable"):
        execute("tests.bad_result", "{}")


def test_evaluate_chunk_scores_the_requested_examples() -> None:
    job = load_job(math_job(name="chunk", trainset=DEV, valset=DEV))
    job_id = f"chunk-{uuid.uuid4().hex[:8]}"
    register_runtime(job_id, job.spec)
    try:
        body = json.dumps({"job": job_id, "split": "val", "candidate": None, "example_ids": [4, 1]})
        first = execute("evaluate_chunk", body)
        assert [row["id"] for row in first["results"]] == [4, 1]
        assert all(row["score"] in (0.0, 1.0) and row["error"] is None for row in first["results"])
        assert first["usage"]["sim/math"]["calls"] == 2
        assert first["usage"]["sim/math"]["prompt_tokens"] > 0
        # Pure and idempotent: the same payload gives the same result.
        assert execute("evaluate_chunk", body) == first
    finally:
        forget_runtime(job_id)


def test_evaluate_chunk_for_an_unknown_job_says_so() -> None:
    body = json.dumps({"job": "no-such-job", "split": "val", "candidate": None, "example_ids": [0]})
    with pytest.raises(JobNotFoundError, match="no-such-job"):
        execute("evaluate_chunk", body)
