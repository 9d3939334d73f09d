"""The executor contract, run on every in-process adapter (inline and thread)."""

from __future__ import annotations

import random
import threading
import uuid
from collections.abc import Iterator

import pytest

from dmipro.errors import ConfigError, DecodeError, ExecutorError, RefError, TaskError
from dmipro.executor_adapters import (
    ExecutorAdapter,
    InlineAdapter,
    ThreadAdapter,
    encode_payload,
    make_executor,
)
from dmipro.jobs import forget_runtime, load_job, register_runtime
from tests.fixtures import tasks as fixture_tasks
from tests.fixtures.jobs import math_job, records

DEV = records("dev", 12)


@pytest.fixture(params=["inline", "thread"])
def executor(request: pytest.FixtureRequest) -> Iterator[ExecutorAdapter]:
    ex = make_executor(request.param, concurrency=4)
    yield ex
    ex.close()


def test_make_executor_builds_the_named_adapter() -> None:
    with make_executor("inline") as inline, make_executor("thread", 3) as thread:
        assert isinstance(inline, InlineAdapter) and inline.capacity == 1 and inline.name == "inline"
        assert isinstance(thread, ThreadAdapter) and thread.capacity == 3 and thread.name == "thread"
        assert not inline.remote and not thread.remote
    with pytest.raises(ConfigError, match="unknown executor backend 'dask'"):
        make_executor("dask")
    with pytest.raises(ExecutorError, match="at least 1"):
        ThreadAdapter(0)


def test_submit_runs_a_registered_task(executor: ExecutorAdapter) -> None:
    result = executor.submit("tests.echo", {"n": 1, "text": "héllo", "items": [1, 2.5, None, True]})
    assert result.result(timeout=10) == {"echo": {"n": 1, "text": "héllo", "items": [1, 2.5, None, True]}}


def test_map_yields_every_index_once(executor: ExecutorAdapter) -> None:
    rng = random.Random(0)
    payloads = [{"n": i, "sleep": rng.choice([0.0, 0.001, 0.005])} for i in range(40)]
    seen = list(executor.map("tests.echo", payloads))
    assert sorted(i for i, _ in seen) == list(range(40))
    assert all(result["echo"] == payloads[i] for i, result in seen)


def test_leaving_a_map_early_cancels_the_tasks_not_yet_started() -> None:
    fixture_tasks.CALLS.clear()
    key = uuid.uuid4().hex
    payloads = [{"n": 0, "key": key}] + [{"n": i, "key": key, "hold": True} for i in range(1, 5)]
    with ThreadAdapter(1) as ex:
        results = ex.map("tests.held", payloads)
        assert next(results) == (0, {})
        results.close()  # task 1 may have taken the slot (held at its gate); 2-4 wait for it
        fixture_tasks.gate(key).set()
        # One slot, first come first served: whatever of 1-4 was not cancelled runs before this.
        ex.submit("tests.held", {"n": 99, "key": key}).result(timeout=10)
    assert [c["n"] for c in fixture_tasks.CALLS] in ([0, 99], [0, 1, 99])


def test_map_of_nothing_yields_nothing(executor: ExecutorAdapter) -> None:
    assert list(executor.map("tests.echo", [])) == []


def test_a_failing_task_raises_task_error_naming_the_original_type(executor: ExecutorAdapter) -> None:
    with pytest.raises(TaskError, match="task tests.fail failed: ValueError: task failed on 3") as info:
        executor.submit("tests.fail", {"n": 3}).result(timeout=10)
    assert info.value.error_type == "ValueError" and info.value.task == "tests.fail"
    with pytest.raises(TaskError) as info:
        list(executor.map("tests.fail", [{"n": i} for i in range(5)]))
    assert info.value.error_type == "ValueError"


def test_dmipro_errors_cross_unchanged(executor: ExecutorAdapter) -> None:
    with pytest.raises(RefError, match="not allowed") as info:
        executor.submit("tests.refuse", {}).result(timeout=10)
    assert info.value.field == "program"


@pytest.mark.parametrize(
    "payload",
    [{"value": object()}, {"value": float("nan")}, {"value": {1, 2}}, {"value": b"bytes"}],
    ids=["object", "nan", "set", "bytes"],
)
def test_non_json_payloads_are_refused_before_shipping(executor: ExecutorAdapter, payload: dict) -> None:
    fixture_tasks.CALLS.clear()
    with pytest.raises(DecodeError, match="not JSON-serializable"):
        executor.submit("tests.record", payload)
    executor.close()
    assert fixture_tasks.CALLS == []


def test_map_refuses_a_batch_with_a_bad_payload_before_shipping_any(executor: ExecutorAdapter) -> None:
    fixture_tasks.CALLS.clear()
    with pytest.raises(DecodeError, match="not JSON-serializable"):
        list(executor.map("tests.record", [{"n": 0}, {"n": 1}, {"n": object()}]))
    executor.close()
    # A half-shipped batch would leave tasks running (or queued on remote workers) that nobody collects.
    assert fixture_tasks.CALLS == []


def test_a_result_that_is_not_json_is_a_decode_error(executor: ExecutorAdapter) -> None:
    with pytest.raises(DecodeError, match="result is not JSON-serializable"):
        executor.submit("tests.bad_result", {}).result(timeout=10)


def test_results_are_plain_json(executor: ExecutorAdapter) -> None:
    assert executor.submit("tests.tuple_result", {}).result(timeout=10) == {
        "pair": [1, 2],
        "nested": {"t": ["a"]},
    }


def test_an_unknown_task_fails_in_the_caller(executor: ExecutorAdapter) -> None:
    with pytest.raises(TaskError, match="unknown task 'tests.nope'") as info:
        executor.submit("tests.nope", {})
    assert info.value.task == "tests.nope"
    with pytest.raises(TaskError, match="unknown task"):
        list(executor.map("tests.nope", [{}]))


def test_inline_runs_in_the_calling_thread() -> None:
    with InlineAdapter(concurrency=8) as ex:
        assert ex.capacity == 1
        assert ex.submit("tests.thread", {}).result()["thread"] == threading.get_ident()


def test_thread_runs_tasks_at_once_up_to_its_concurrency() -> None:
    key = uuid.uuid4().hex
    with ThreadAdapter(4) as ex:
        # Each task waits until four of them are running together; fewer slots would time out.
        results = list(ex.map("tests.barrier", [{"key": key, "parties": 4}] * 4))
        assert [r for _, r in results] == [{"passed": True}] * 4
        threads = {ex.submit("tests.thread", {}).result(timeout=10)["thread"] for _ in range(8)}
        assert threading.get_ident() not in threads


def test_thread_close_finishes_running_tasks() -> None:
    ex = ThreadAdapter(2)
    futures = [ex.submit("tests.echo", {"n": i, "sleep": 0.01}) for i in range(2)]
    ex.close()
    assert [f.result(timeout=1)["echo"]["n"] for f in futures] == [0, 1]


def test_executors_run_the_real_evaluate_chunk_task(executor: ExecutorAdapter) -> None:
    job = load_job(math_job(name="exec", trainset=DEV, valset=DEV))
    job_id = f"exec-{uuid.uuid4().hex[:8]}"
    register_runtime(job_id, job.spec)
    try:
        payloads = [
            {"job": job_id, "split": "val", "candidate": None, "example_ids": ids}
            for ids in ([0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11])
        ]
        results = dict(executor.map("evaluate_chunk", payloads))
        ids = [row["id"] for i in range(4) for row in results[i]["results"]]
        assert ids == list(range(12))
        assert sum(next(iter(r["usage"].values()))["calls"] for r in results.values()) == 12
    finally:
        forget_runtime(job_id)


def test_encode_payload_is_canonical() -> None:
    assert (
        encode_payload({"b": 1, "a": [1, 2]}) == encode_payload({"a": [1, 2], "b": 1}) == '{"a":[1,2],"b":1}'
    )
