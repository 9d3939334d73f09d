"""Evaluation: DSPy's score, per-example results, failures, usage, the score cache and chunking."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import dspy
import pytest

import dmipro
import dmipro.jobs.runtime as runtime_module
from dmipro.errors import EvaluationError
from dmipro.evaluation import EvalRequest, EvaluationResult, Evaluator, StoreScoreCache
from dmipro.events import Event, bus
from dmipro.executor_adapters import ExecutorAdapter, InlineAdapter, ThreadAdapter
from dmipro.jobs import JobRuntime, JobStore, forget_runtime, load_job, register_runtime
from dmipro.lm._sim import sim_lm
from examples.math_qa.program import build, exact_match
from tests.fixtures import metrics
from tests.fixtures.jobs import math_job, records

GOOD = {
    "predict": {
        "instruction": "Think step by step, double-check the arithmetic, and give the final "
        "answer as a single number.",
        "demos": [],
    }
}

MakeRuntime = Callable[..., JobRuntime]


@pytest.fixture
def make_runtime() -> Iterator[MakeRuntime]:
    """Register a math_qa job runtime under a fresh id (``job_id`` to reuse one); forgotten afterwards."""
    made: list[str] = []

    def make(n: int = 20, *, job_id: str | None = None, **overrides: Any) -> JobRuntime:
        job = load_job(math_job(n, **overrides))
        job_id = job_id or f"eval-{uuid.uuid4().hex[:8]}"
        made.append(job_id)
        return register_runtime(job_id, job.spec)

    yield make
    for job_id in made:
        forget_runtime(job_id)


@pytest.fixture(params=["inline", "thread"])
def executor(request: pytest.FixtureRequest) -> Iterator[ExecutorAdapter]:
    ex: ExecutorAdapter = InlineAdapter() if request.param == "inline" else ThreadAdapter(8)
    yield ex
    ex.close()


def _dspy_evaluate(n: int) -> Any:
    devset = [dspy.Example(**r).with_inputs("question") for r in records("dev", n)]
    with dspy.context(lm=sim_lm(temperature=0.0)):
        return dspy.Evaluate(devset=devset, metric=exact_match, num_threads=1, display_progress=False)(
            build()
        )


@pytest.mark.parametrize("backend", ["inline", "thread"])
def test_the_score_is_dspy_evaluates_percentage(backend: str) -> None:
    reference = _dspy_evaluate(60)
    result = dmipro.evaluate(math_job(60), executor=backend, concurrency=8)
    assert isinstance(result, EvaluationResult)
    assert 0 < result.score < 100
    assert result.score == reference.score
    assert [r.id for r in result.results] == list(range(60))
    assert [r.score for r in result.results] == [score for _, _, score in reference.results]
    assert result.n == 60 and result.errors == 0


def test_evaluate_is_deterministic_across_executors_and_concurrency() -> None:
    scores = {
        dmipro.evaluate(math_job(30), executor=b, concurrency=c).score
        for b, c in [("inline", 1), ("thread", 1), ("thread", 4), ("thread", 30)]
    }
    assert len(scores) == 1


def test_evaluate_uses_the_last_80_percent_of_the_trainset_without_a_valset() -> None:
    spec = math_job(5, trainset=records("train", 50))
    del spec["valset"]
    result = dmipro.evaluate(spec, executor="inline")
    assert result.n == 40
    reference = dmipro.evaluate(math_job(5, valset=records("train", 50)[10:]), executor="inline")
    assert result.score == reference.score


def test_evaluate_leaves_no_job_runtime_behind() -> None:
    before = set(runtime_module._runtimes)
    dmipro.evaluate(math_job(5), executor="inline")
    dmipro.evaluate(math_job(5), executor="thread", concurrency=2)
    assert set(runtime_module._runtimes) == before


def test_evaluate_in_process_writes_nothing(dmipro_home: Any) -> None:
    dmipro.evaluate(math_job(5), executor="thread", concurrency=2)
    assert not dmipro_home.exists() or not any(dmipro_home.rglob("*"))


def test_a_metric_that_raises_scores_failure_score(
    make_runtime: MakeRuntime, executor: ExecutorAdapter
) -> None:
    n = 30
    rt = make_runtime(n, metric="tests.fixtures.metrics:flaky_metric")
    result = Evaluator(rt.job_id, executor, size=n, failure_score=0.25)()
    reference = _dspy_evaluate(n)
    failing = [i for i, r in enumerate(records("dev", n)) if int(r["answer"]) % 3 == 0]
    assert failing and len(failing) < n
    for i, item in enumerate(result.results):
        assert item.id == i
        if i in failing:
            assert item.score == 0.25
            assert item.error == f"ValueError: cannot score answer {records('dev', n)[i]['answer']}"
        else:
            assert item.error is None and item.score == reference.results[i][2]
    assert result.errors == len(failing)
    assert result.score == round(100 * sum(r.score for r in result.results) / n, 2)


def test_max_errors_stops_the_evaluation(make_runtime: MakeRuntime, executor: ExecutorAdapter) -> None:
    rt = make_runtime(20, metric="tests.fixtures.metrics:raising_metric")
    with pytest.raises(EvaluationError, match=r"max_errors=3.*ValueError: metric exploded"):
        Evaluator(rt.job_id, executor, size=20, max_errors=3)()
    # Without a limit every example scores the failure score.
    result = Evaluator(rt.job_id, executor, size=20)()
    assert result.score == 0.0 and result.errors == 20


def test_usage_counts_every_lm_call(make_runtime: MakeRuntime, executor: ExecutorAdapter) -> None:
    rt = make_runtime(25)
    before = len(rt.task_lm.history)
    result = Evaluator(rt.job_id, executor, size=25)()
    calls = rt.task_lm.history[before:]
    assert result.usage.calls == len(calls) == 25
    assert result.usage.prompt_tokens == sum(c["usage"]["prompt_tokens"] for c in calls) > 0
    assert result.usage.completion_tokens == sum(c["usage"]["completion_tokens"] for c in calls) > 0
    assert result.usage.tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    assert result.usage.cost_usd is not None and result.usage.cost_usd > 0
    assert set(result.usage.models) == {"sim/math"}


def test_a_second_evaluation_of_the_same_candidate_makes_no_lm_calls(
    make_runtime: MakeRuntime, executor: ExecutorAdapter
) -> None:
    store = JobStore()
    job_id = store.create(name="cached", spec={}, executor=executor.name).id
    rt = make_runtime(20, job_id=job_id)
    cache = StoreScoreCache(store, job_id, "val")
    evaluate = Evaluator(job_id, executor, size=20, cache=cache)

    first = evaluate(GOOD)
    assert first.usage.calls == 20 and first.cached == 0
    calls = len(rt.task_lm.history)
    second = evaluate(GOOD)
    assert second.usage.calls == 0 and second.cached == 20
    assert len(rt.task_lm.history) == calls
    assert second.score == first.score and second.results == first.results

    # A cache written by another evaluator on the same database serves it too.
    again = Evaluator(job_id, executor, size=20, cache=StoreScoreCache(JobStore(), job_id, "val"))(GOOD)
    assert again.usage.calls == 0 and again.score == first.score


def test_the_cache_serves_the_examples_it_has_and_runs_the_rest(
    make_runtime: MakeRuntime, executor: ExecutorAdapter
) -> None:
    store = JobStore()
    job_id = store.create(name="partial", spec={}, executor=executor.name).id
    make_runtime(20, job_id=job_id)
    evaluate = Evaluator(job_id, executor, size=20, cache=StoreScoreCache(store, job_id, "val"))
    minibatch = evaluate(GOOD, [3, 7, 11, 12, 19])
    full = evaluate(GOOD)
    assert full.usage.calls == 15 and full.cached == 5
    assert [full.results[i] for i in (3, 7, 11, 12, 19)] == minibatch.results
    uncached = Evaluator(job_id, executor, size=20)(GOOD)
    assert full.results == uncached.results

    other = evaluate(None)  # another candidate shares nothing
    assert other.usage.calls == 20 and other.cached == 0
    train = Evaluator(
        job_id, executor, split="train", size=20, cache=StoreScoreCache(store, job_id, "train")
    )(GOOD)
    assert train.cached == 0


def test_failed_examples_are_not_cached(make_runtime: MakeRuntime, executor: ExecutorAdapter) -> None:
    store = JobStore()
    job_id = store.create(name="flaky", spec={}, executor=executor.name).id
    make_runtime(20, job_id=job_id, metric="tests.fixtures.metrics:flaky_metric")
    evaluate = Evaluator(job_id, executor, size=20, cache=StoreScoreCache(store, job_id, "val"))
    first = evaluate(None)
    second = evaluate(None)
    assert first.errors > 0
    assert second.usage.calls == first.errors and second.cached == 20 - first.errors
    assert second.results == first.results


class RecordingExecutor(ThreadAdapter):
    """A thread executor that keeps every payload it ships."""

    def __init__(self, concurrency: int) -> None:
        super().__init__(concurrency)
        self.payloads: list[dict[str, Any]] = []

    def _ship(self, task: str, body: str) -> Future[dict[str, Any]]:
        self.payloads.append(json.loads(body))
        return super()._ship(task, body)


@pytest.mark.parametrize("capacity", [1, 4, 16, 64])
@pytest.mark.parametrize("size", [1, 7, 35, 100])
def test_chunks_cover_every_example_exactly_once(make_runtime: MakeRuntime, size: int, capacity: int) -> None:
    rt = make_runtime(size, metric="tests.fixtures.metrics:counting_metric")
    metrics.SCORED.clear()
    with RecordingExecutor(capacity) as ex:
        result = Evaluator(rt.job_id, ex, size=size, chunk_size=5)()
    shipped = [i for p in ex.payloads for i in p["example_ids"]]
    assert sorted(shipped) == list(range(size))
    assert all(1 <= len(p["example_ids"]) <= 5 for p in ex.payloads)
    assert [r.id for r in result.results] == list(range(size))
    assert set(metrics.SCORED.values()) == {1} and len(metrics.SCORED) == size
    # The work is spread over the slots: no slot runs more examples in a row than it must.
    if math.ceil(size / capacity) <= 5:
        rounds = math.ceil(len(ex.payloads) / capacity)
        longest = max(len(p["example_ids"]) for p in ex.payloads)
        assert rounds * longest == math.ceil(size / capacity)


def test_explicit_example_ids_keep_their_order(make_runtime: MakeRuntime, executor: ExecutorAdapter) -> None:
    rt = make_runtime(20)
    whole = Evaluator(rt.job_id, executor, size=20)()
    ids = [17, 2, 9, 0]
    part = Evaluator(rt.job_id, executor, size=20)(None, ids)
    assert [r.id for r in part.results] == ids
    assert part.results == [whole.results[i] for i in ids]
    empty = Evaluator(rt.job_id, executor, size=20)(None, [])
    assert empty.n == 0 and empty.score == 0.0 and empty.usage.calls == 0


def test_evaluate_many_keeps_candidates_apart(make_runtime: MakeRuntime, executor: ExecutorAdapter) -> None:
    rt = make_runtime(30)
    evaluator = Evaluator(rt.job_id, executor, size=30)
    together = evaluator.evaluate_many([EvalRequest(None), EvalRequest(GOOD), EvalRequest(GOOD, [0, 1, 2])])
    alone = [evaluator(None), evaluator(GOOD), evaluator(GOOD, [0, 1, 2])]
    assert [r.results for r in together] == [r.results for r in alone]
    assert [r.usage.calls for r in together] == [30, 30, 3]
    assert together[1].score > together[0].score  # the simulator rewards the better instruction


def test_each_evaluation_emits_start_and_batch_complete_once(
    make_runtime: MakeRuntime, executor: ExecutorAdapter
) -> None:
    rt = make_runtime(10)
    seen: list[Event] = []
    sub = bus.subscribe("dspy.evaluation.*", seen.append)
    try:
        result = Evaluator(rt.job_id, executor, size=10)(GOOD, trial=4)
    finally:
        bus.remove(sub)
    assert [e.name for e in seen] == ["dspy.evaluation.start", "dspy.evaluation.batch_complete"]
    assert all(e.job_id == rt.job_id and e.trial == 4 for e in seen)
    assert seen[0].data["n"] == 10
    assert seen[1].data["score"] == result.score and seen[1].data["n"] == 10
