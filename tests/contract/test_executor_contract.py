"""What every executor promises, checked on inline, thread, celery and rq alike.

The same payloads give the same results everywhere: evaluation scores, bootstrapped
demos, proposed instructions, and a whole small optimization (same seed, same best
score, same best candidate).
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from dmipro.api import evaluate
from dmipro.errors import DecodeError, RefError, TaskError
from dmipro.executor_adapters import ExecutorAdapter, InlineAdapter, make_executor
from dmipro.jobs import JobStore, load_job
from dmipro.jobs.plan import plan_demo_sets
from dmipro.teleprompt.mipro import run_job
from tests.contract.conftest import CONCURRENCY
from tests.fixtures.jobs import math_job, records

TIMEOUT = 60


def small_job(**optimizer: Any) -> dict[str, Any]:
    """math_qa on 20 train / 20 dev examples, three candidates, four trials, seed 9."""
    opt = {"auto": None, "num_candidates": 3, "num_trials": 4, "minibatch_size": 10, "seed": 9}
    opt.update(optimizer)
    return math_job(
        name="contract",
        trainset=records("train", 20),
        valset=records("dev", 20),
        prompt_lm={"model": "sim/math", "temperature": 1.0},
        optimizer=opt,
        executor={"backend": "thread", "concurrency": CONCURRENCY},
    )


def stored_job(backend: str, spec: dict[str, Any] | None = None) -> str:
    """A validated job row in the job database the executor's workers read."""
    job = load_job(spec or small_job())
    return JobStore().create(name=job.spec.name, spec=job.to_json(), executor=backend).id


def on(executor: ExecutorAdapter, task: str, payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{} for _ in payloads]
    for i, result in executor.map(task, payloads):
        out[i] = result
    return out


def without_usage(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "usage"} for r in results]


# -- shipping and collecting -------------------------------------------------------------

def test_capacity_is_the_concurrency(executor: ExecutorAdapter, backend: str) -> None:
    assert executor.capacity == (1 if backend == "inline" else CONCURRENCY)
    assert executor.remote is (backend in ("celery", "rq"))


def test_a_task_round_trips_json(executor: ExecutorAdapter) -> None:
    payload = {"n": 1, "text": "héllo", "items": [1, 2.5, None, True], "nested": {"a": []}}
    assert executor.submit("tests.echo", payload).result(timeout=TIMEOUT) == {"echo": payload}


def test_remote_tasks_run_in_worker_processes(executor: ExecutorAdapter) -> None:
    pid = executor.submit("contract.where", {}).result(timeout=TIMEOUT)["pid"]
    assert (pid != os.getpid()) is executor.remote


def test_map_yields_every_index_once(executor: ExecutorAdapter) -> None:
    payloads = [{"n": i, "sleep": (i % 3) * 0.01} for i in range(24)]
    seen = list(executor.map("tests.echo", payloads))
    assert sorted(i for i, _ in seen) == list(range(24))
    assert all(result == {"echo": payloads[i]} for i, result in seen)


def test_a_failing_task_is_a_task_error_naming_the_original_type(executor: ExecutorAdapter) -> None:
    with pytest.raises(TaskError, match="task tests.fail failed: ValueError: task failed on 3") as info:
        executor.submit("tests.fail", {"n": 3}).result(timeout=TIMEOUT)
    assert info.value.error_type == "ValueError" and info.value.task == "tests.fail"
    with pytest.raises(TaskError, match="ValueError"):
        list(executor.map("tests.fail", [{"n": i} for i in range(3)]))


def test_dmipro_errors_keep_their_type_and_field(executor: ExecutorAdapter) -> None:
    with pytest.raises(RefError, match="program: module 'os' is not allowed") as info:
        executor.submit("tests.refuse", {}).result(timeout=TIMEOUT)
    assert info.value.field == "program"


def test_an_unknown_task_fails_in_the_caller(executor: ExecutorAdapter) -> None:
    with pytest.raises(TaskError, match="unknown task 'tests.nope'"):
        executor.submit("tests.nope", {})


def test_a_payload_that_is_not_json_is_refused_before_shipping(executor: ExecutorAdapter) -> None:
    with pytest.raises(DecodeError, match="not JSON-serializable"):
        list(executor.map("tests.echo", [{"n": 0}, {"n": object()}]))


def test_a_result_that_is_not_json_is_a_decode_error(executor: ExecutorAdapter) -> None:
    with pytest.raises(DecodeError, match="result is not JSON-serializable"):
        executor.submit("tests.bad_result", {}).result(timeout=TIMEOUT)


# -- the real tasks give the same results everywhere --------------------------------------

def test_evaluate_scores_the_same_everywhere(executor: ExecutorAdapter) -> None:
    spec = small_job()
    result = evaluate(spec, executor=executor)
    reference = evaluate(spec, executor="inline")
    assert result.n == reference.n == 20
    assert result.score == reference.score
    assert [(r.id, r.score, r.error) for r in sorted(result.results, key=lambda r: r.id)] == \
        [(r.id, r.score, r.error) for r in sorted(reference.results, key=lambda r: r.id)]
    assert result.usage.calls == reference.usage.calls == 20


def test_bootstrap_builds_the_same_demo_sets_everywhere(executor: ExecutorAdapter, backend: str) -> None:
    job_id = stored_job(backend)
    plans = plan_demo_sets(4, max_bootstrapped=4, max_labeled=4, seed=9)
    payloads = [
        {"job": job_id, "index": p.index, "kind": p.kind, "shuffle_seed": p.shuffle_seed,
         "max_bootstrapped": p.max_bootstrapped, "max_labeled": p.max_labeled, "max_rounds": 1,
         "metric_threshold": None, "max_errors": None}
        for p in plans if p.kind != "zeroshot"
    ]
    results = on(executor, "bootstrap_demo_set", payloads)
    with InlineAdapter() as inline:
        reference = on(inline, "bootstrap_demo_set", payloads)
    assert without_usage(results) == without_usage(reference)
    assert any(r["demos"]["predict"] for r in results)


def test_proposals_are_the_same_everywhere(executor: ExecutorAdapter, backend: str) -> None:
    job_id = stored_job(backend)
    payloads = [
        {"job": job_id, "predictor": "predict", "index": i, "seed": 1000 + i, "temperature": 1.0,
         "context": {"task_demos": "No task demos provided.",
                     "basic_instruction": "Answer the arithmetic word problem.",
                     **({"tip": "Keep the instruction clear and concise."} if i % 2 else {})}}
        for i in range(1, 5)
    ]
    results = on(executor, "propose_instruction", payloads)
    with InlineAdapter() as inline:
        reference = on(inline, "propose_instruction", payloads)
    assert without_usage(results) == without_usage(reference)
    assert len({r["instruction"] for r in results}) > 1


_reference: dict[str, dict[str, Any]] = {}


def reference_run() -> dict[str, Any]:
    """The small job optimized inline in this process (once per session)."""
    if "small" not in _reference:
        job_id = stored_job("inline")
        run_job(job_id, executor=InlineAdapter())
        _reference["small"] = dict(JobStore().get(job_id).result or {})
    return _reference["small"]


def test_optimize_finds_the_same_best_program_everywhere(backend: str) -> None:
    spec = small_job()
    if backend in ("celery", "rq"):
        from dmipro.jobs.submit import submit

        handle = submit(spec, executor=backend)
        report = handle.wait(timeout=180)
        assert report["state"] == "succeeded", report
        job_id = handle.job_id
        program = handle.result()
        assert JobStore().get(job_id).executor == backend
    else:
        job_id = stored_job(backend, spec)
        with make_executor(backend, CONCURRENCY) as ex:
            run_job(job_id, executor=ex)
        program = None
    result = JobStore().get(job_id).result or {}
    reference = reference_run()
    assert result["trials"] == reference["trials"] == 4
    assert result["best_score"] == reference["best_score"]
    assert result["baseline_score"] == reference["baseline_score"]
    assert result["best_candidate"] == reference["best_candidate"]
    # Each task's result counts once, wherever it ran.
    assert result["lm_calls"] == reference["lm_calls"]
    if program is not None:
        best = reference["best_candidate"]["predict"]
        assert program.predict.signature.instructions == best["instruction"]
        assert len(program.predict.demos) == len(best["demos"])
