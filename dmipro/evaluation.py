"""Evaluate a program or a candidate on a dataset, fanned out over any executor.

The examples are cut into chunks sized to fill the executor (at most ``chunk_size``
examples each); each chunk is one ``evaluate_chunk`` task. Scores are a percentage,
0-100, as DSPy's ``Evaluate`` reports them. With a score cache, examples already
scored for the same candidate are not run again (MIPROv2's full evaluations reuse what
its minibatches scored).

An example whose LM call still failed after its retries is *errored*, not a wrong
answer: it gets no score, is not cached, and is evaluated again in a later round (up to
``error_rounds``), so an evaluation is complete before anyone reads its score. When it
cannot be completed, or when the LM errors counted across the evaluator's life pass
``max_errors``, the evaluation raises :class:`~dmipro.errors.EvaluationError` with the
reason instead of returning a score computed on fewer examples.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from dmipro.errors import EvaluationError
from dmipro.events import bus
from dmipro.executor_adapters.base import ExecutorAdapter
from dmipro.jobs.candidate import Candidate, fingerprint
from dmipro.lm.faults import FaultCounts
from dmipro.lm.usage import Usage
from dmipro.tasks import evaluate as _evaluate_body  # noqa: F401  (registers evaluate_chunk, shipped here)
from dmipro.tracing import span

__all__ = [
    "chunk_size_for",
    "EvalRequest",
    "EvaluationResult",
    "Evaluator",
    "ExampleScore",
    "ScoreCache",
    "StoreScoreCache",
]


@dataclass(frozen=True)
class ExampleScore:
    """One example's score; ``error`` holds the exception text when the program or metric raised."""

    id: int
    score: float
    error: str | None = None


@dataclass
class EvaluationResult:
    """Scores of one candidate on some examples."""

    score: float
    results: list[ExampleScore]
    usage: Usage = field(default_factory=Usage)
    wall_s: float = 0.0
    cached: int = 0
    faults: FaultCounts = field(default_factory=FaultCounts)
    """LM failures, retries and rate-limit waits of this evaluation's calls."""

    @property
    def n(self) -> int:
        return len(self.results)

    @property
    def errors(self) -> int:
        return sum(1 for r in self.results if r.error is not None)

    def to_json(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "n": self.n,
            "errors": self.errors,
            "cached": self.cached,
            "wall_s": round(self.wall_s, 3),
            "usage": self.usage.summary(),
            **self.faults.summary(),
        }


@dataclass(frozen=True)
class EvalRequest:
    """One candidate on some examples of a split (``example_ids`` None: the whole split)."""

    candidate: Candidate | None = None
    example_ids: Sequence[int] | None = None
    trial: int | None = None


class ScoreCache(Protocol):
    """Per-example scores by candidate fingerprint."""

    def get(self, fingerprint: str) -> dict[str, tuple[float, str | None]]: ...

    def put(self, fingerprint: str, rows: Sequence[tuple[str, float, str | None]]) -> None: ...


class StoreScoreCache:
    """A :class:`ScoreCache` in the job database, scoped to one job and split."""

    def __init__(self, store: Any, job_id: str, split: str) -> None:
        self.store, self.job_id, self.split = store, job_id, split

    def get(self, fingerprint: str) -> dict[str, tuple[float, str | None]]:
        scores: dict[str, tuple[float, str | None]] = self.store.cached_scores(
            self.job_id, f"{self.split}:{fingerprint}"
        )
        return scores

    def put(self, fingerprint: str, rows: Sequence[tuple[str, float, str | None]]) -> None:
        self.store.put_scores(self.job_id, f"{self.split}:{fingerprint}", rows)


def chunk_size_for(total: int, capacity: int, max_chunk: int) -> int:
    """Examples per task so that ``total`` examples fill ``capacity`` slots in as few waves as possible.

    ``max_chunk`` caps a task's size (a redelivered task repeats at most that much work);
    within the cap, chunks are sized so the last wave is as full as the others.
    """
    slots = max(1, capacity)
    waves = max(1, math.ceil(total / (slots * max(1, max_chunk))))
    return max(1, math.ceil(total / (waves * slots)))


class Evaluator:
    """Scores candidates of one job on one split through an executor.

    Emits ``dspy.evaluation.start`` and ``dspy.evaluation.batch_complete`` once per
    evaluated candidate; a request served entirely from the cache evaluates nothing and
    emits nothing.
    """

    def __init__(
        self,
        job_id: str,
        executor: ExecutorAdapter,
        *,
        split: str = "val",
        size: int,
        failure_score: float = 0.0,
        max_errors: int | None = None,
        chunk_size: int = 5,
        cache: ScoreCache | None = None,
        error_rounds: int = 3,
        lm_errors: FaultCounts | None = None,
    ) -> None:
        """``max_errors`` caps the program errors of one evaluation and the LM errors counted
        into ``lm_errors`` (shared by a job's evaluators, so the cap is the search's);
        ``error_rounds`` is how many times an errored example is tried again."""
        self.job_id = job_id
        self.executor = executor
        self.split = split
        self.size = size
        self.failure_score = failure_score
        self.max_errors = max_errors
        self.chunk_size = chunk_size
        self.cache = cache
        self.error_rounds = error_rounds
        self.lm_errors = lm_errors if lm_errors is not None else FaultCounts()

    def __call__(
        self,
        candidate: Candidate | None = None,
        example_ids: Sequence[int] | None = None,
        *,
        trial: int | None = None,
    ) -> EvaluationResult:
        return self.evaluate_many([EvalRequest(candidate, example_ids, trial)])[0]

    def evaluate_many(
        self, requests: Sequence[EvalRequest], on_done: Callable[[int], None] | None = None
    ) -> list[EvaluationResult]:
        """Evaluate several candidates at once, sharing the executor's capacity.

        ``on_done(k)`` is called (on this thread) as soon as request ``k`` has a score for every
        example, so progress can count finished evaluations while the others still run.
        """
        with span(
            "dmipro.evaluate",
            job_id=self.job_id,
            split=self.split,
            candidates=len(requests),
            trials=",".join(str(r.trial) for r in requests if r.trial is not None) or None,
        ):
            return self._evaluate_many(requests, on_done)

    def _round(
        self,
        plans: list[Any],
        todo: list[tuple[int, list[int]]],
        usages: list[Usage],
        faults: list[FaultCounts],
        done: Callable[[int], None],
    ) -> list[tuple[tuple[int, list[int]], str]]:
        """Evaluate ``todo`` once; return, per plan, the ids whose LM calls still failed."""
        total = sum(len(ids) for _, ids in todo)
        chunk = chunk_size_for(total, self.executor.capacity, self.chunk_size)
        payloads, owners = [], []
        for k, ids in todo:
            req = plans[k][0]
            for lo in range(0, len(ids), chunk):
                payloads.append(
                    {
                        "job": self.job_id,
                        "split": self.split,
                        "candidate": req.candidate,
                        "example_ids": ids[lo : lo + chunk],
                        "failure_score": self.failure_score,
                        "trial": req.trial,
                    }
                )
                owners.append(k)
        errored: dict[int, list[int]] = {}
        last: dict[int, str] = {}
        for index, result in self.executor.map("evaluate_chunk", payloads):
            k = owners[index]
            usages[k].add(Usage.from_json(result["usage"]))
            counts = FaultCounts.from_json(result.get("faults"))
            faults[k].add(counts)
            self.lm_errors.add(counts)
            fresh = []
            for row in result["results"]:
                if row.get("lm_error"):
                    errored.setdefault(k, []).append(int(row["id"]))
                    last[k] = str(row.get("error") or "")
                    continue
                item = ExampleScore(int(row["id"]), float(row["score"]), row.get("error"))
                plans[k][3][item.id] = item
                if item.error is None:
                    fresh.append((str(item.id), item.score, None))
            if self.cache is not None and fresh:
                self.cache.put(plans[k][2], fresh)
            if len(plans[k][3]) == len(plans[k][1]):
                done(k)
        return [((k, sorted(ids)), last.get(k, "")) for k, ids in errored.items()]

    def _evaluate_many(
        self, requests: Sequence[EvalRequest], on_done: Callable[[int], None] | None
    ) -> list[EvaluationResult]:
        start = time.perf_counter()
        finished: set[int] = set()

        def done(k: int) -> None:
            if on_done is not None and k not in finished:
                finished.add(k)
                on_done(k)

        plans = []
        for req in requests:
            ids = list(range(self.size)) if req.example_ids is None else list(req.example_ids)
            fp = fingerprint(req.candidate)
            known = self.cache.get(fp) if self.cache else {}
            scores: dict[int, ExampleScore] = {}
            for i in ids:
                hit = known.get(str(i))
                if hit is not None:
                    scores[i] = ExampleScore(i, hit[0], hit[1])
            plans.append((req, ids, fp, scores, len(scores)))
            if len(scores) == len(ids):
                done(len(plans) - 1)
                continue  # served from the cache: nothing is evaluated, so no event
            bus.emit(
                "dspy.evaluation.start",
                job_id=self.job_id,
                trial=req.trial,
                split=self.split,
                candidate=fp,
                n=len(ids),
                cached=len(scores),
            )

        usages = [Usage() for _ in plans]
        faults = [FaultCounts() for _ in plans]
        todo = [(k, [i for i in ids if i not in scores]) for k, (_, ids, _, scores, _) in enumerate(plans)]
        for round_ in range(self.error_rounds + 1):
            errored = self._round(plans, todo, usages, faults, done)
            errors = sum(1 for _, _, _, scores, _ in plans for r in scores.values() if r.error is not None)
            if self.max_errors is not None and errors >= self.max_errors:
                last = next((r.error for _, _, _, sc, _ in plans for r in sc.values() if r.error), "")
                raise EvaluationError(
                    f"evaluation stopped after {errors} failed examples (max_errors={self.max_errors}); "
                    f"last error: {last}"
                )
            if not errored:
                break
            n = sum(len(ids) for (_, ids), _ in errored)
            last_error = next((msg for _, msg in errored if msg), "")
            if self.max_errors is not None and self.lm_errors.lm_errors > self.max_errors:
                raise EvaluationError(
                    f"{self.lm_errors.lm_errors} LM calls failed after their retries, past max_errors="
                    f"{self.max_errors}; last error: {last_error}"
                )
            if round_ == self.error_rounds:
                raise EvaluationError(
                    f"{n} examples still had no answer after {self.error_rounds + 1} rounds of retried LM "
                    f"calls, so the evaluation is incomplete and no score was recorded; last error: "
                    f"{last_error}"
                )
            todo = [pair for pair, _ in errored]

        wall = time.perf_counter() - start
        out = []
        for k, (req, ids, fp, scores, cached) in enumerate(plans):
            ordered = [scores[i] for i in ids]
            score = round(100.0 * sum(r.score for r in ordered) / len(ordered), 2) if ordered else 0.0
            res = EvaluationResult(score, ordered, usages[k], wall, cached, faults[k])
            out.append(res)
            if cached == len(ids):
                continue
            bus.emit(
                "dspy.evaluation.batch_complete",
                job_id=self.job_id,
                trial=req.trial,
                split=self.split,
                candidate=fp,
                **res.to_json(),
            )
        return out
