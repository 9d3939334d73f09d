"""Phase 3 of MIPROv2: the Bayesian search over instruction × demo-set candidates.

:class:`SearchPhase` drives one job's Optuna :class:`~dmipro.teleprompt.search.Study`
for its :class:`~dmipro.teleprompt.coordinator.Coordinator`, as
:class:`~dmipro.propose.proposer.GroundedProposer` does phase 2: it asks batches of
trials (TPE, constant liar), evaluates them on a minibatch the batch shares, tells the
scores, evaluates the best minibatch candidates on the full valset every
``minibatch_full_eval_steps`` trials, and stops on the trial count, the LM budget or a
cancel. Two rounds are in flight when the executor allows (see :meth:`SearchPhase.run`).
The study lives in the job database, so a search resumed after a crash re-runs the
trials in flight and carries on.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dmipro.errors import OptimizationError
from dmipro.evaluation import EvalRequest, EvaluationResult, Evaluator
from dmipro.events import bus
from dmipro.jobs.candidate import apply_candidate, fingerprint
from dmipro.lm.usage import Usage
from dmipro.seeding import rng_for
from dmipro.teleprompt.result import OptimizationResult, PhaseStats
from dmipro.teleprompt.search import SearchState, Study, TrialKind, trial_batch, trial_kind
from dmipro.tracing import span

if TYPE_CHECKING:  # the coordinator builds a SearchPhase; at run time this module never imports it
    from dmipro.teleprompt.coordinator import Coordinator

__all__ = ["Budget", "SearchPhase", "evaluate_unique"]


class Budget:
    """A job's LM budget: ``max_lm_calls`` and ``max_cost_usd``, either optional."""

    def __init__(self, max_lm_calls: int | None, max_cost_usd: float | None) -> None:
        self.max_lm_calls, self.max_cost_usd = max_lm_calls, max_cost_usd

    def exhausted(self, usage: Usage) -> bool:
        if self.max_lm_calls is not None and usage.calls >= self.max_lm_calls:
            return True
        cost = usage.cost_usd
        return self.max_cost_usd is not None and cost is not None and cost >= self.max_cost_usd

    def room_calls(self, usage: Usage) -> float:
        """How many more LM calls fit (by calls and, through the mean price, by cost)."""
        room = math.inf
        if self.max_lm_calls is not None:
            room = self.max_lm_calls - usage.calls
        cost = usage.cost_usd
        if self.max_cost_usd is not None and cost is not None and usage.calls:
            room = min(room, (self.max_cost_usd - cost) / (cost / usage.calls) if cost else math.inf)
        return room



@dataclass(eq=False)
class _Round:
    """One round of the search: full evaluations now due, trials asked together, one minibatch."""

    batch: int
    picks: list[tuple[str, dict[str, Any]]]
    trials: list[Any]
    counted: set[int] = field(default_factory=set)
    """Indexes (into the round's requests) of the trials that count towards ``num_trials``."""
    finished: int = 0
    future: Future[list[EvaluationResult]] = field(default_factory=Future)


class _Progress:
    """``trials_done`` as the job reports it: trials told, plus those of the rounds in flight whose
    evaluation has finished (counted from the threads that evaluate them)."""

    def __init__(self, run: Coordinator) -> None:
        self.run_ = run
        self._lock = threading.Lock()
        self._done = 0
        self._scores: dict[str, Any] = {}
        self._rounds: list[_Round] = []

    def told(self, done: int, scores: dict[str, Any]) -> None:
        with self._lock:
            self._done, self._scores = done, scores
            self._report()

    def add(self, rnd: _Round) -> None:
        with self._lock:
            self._rounds.append(rnd)

    def remove(self, rnd: _Round) -> None:
        with self._lock:
            self._rounds.remove(rnd)

    def finished(self, rnd: _Round, j: int) -> None:
        if j in rnd.counted:
            with self._lock:
                rnd.finished += 1
                self._report()

    def _report(self) -> None:
        done = self._done + sum(r.finished for r in self._rounds)
        self.run_.progress("search", trials_done=done, trials_total=self.run_.plan.num_trials, **self._scores)


class SearchPhase:
    """Phase 3 of one job over its coordinator's executor, store and plan; see the module docstring."""

    def __init__(self, run: Coordinator, study: Study) -> None:
        self.run_ = run
        self.study = study
        self._progress = _Progress(run)
        self._eval_calls = self._eval_examples = 0
        """LM calls and evaluated examples of the trials told so far (a budget's per-trial estimate)."""
        self._next_label = 0

    def ask_first_batch(self) -> None:
        """Ask the baseline and the first batch of trials now, while phases 1 and 2 run.

        Asking only needs the shape of the search space, which the plan fixes; each ask
        is a few storage writes, so doing them here takes them off the search's critical
        path. The search then evaluates them as trials in flight. Skipped on a resumed
        search and under a budget (whose batch size depends on what phases 1-2 cost).
        """
        run, study = self.run_, self.study
        if run.opt.max_lm_calls is not None or run.opt.max_cost_usd is not None or study.trials():
            return
        k = self._batch_size(SearchState(), 0, 1)  # 1: the baseline
        kind = TrialKind.MINIBATCH if run.plan.minibatch else TrialKind.FULL
        study.ask(TrialKind.BASELINE, 0, study.space.baseline_params())
        for _ in range(k):
            study.ask(kind, 0)

    def run(self, start: float, prefetched: EvaluationResult | None = None) -> OptimizationResult:
        """Search until the trials, the budget or a cancel end it; the result of the best candidate.

        Each round asks trials (and picks the full evaluations now due), evaluates them and
        tells the scores. When the executor fills itself (``parallel_trials`` unset, no
        budget) two rounds are in flight: round r+1 is planned and shipped as soon as round
        r is, so its tasks fill the slots that r's slowest examples leave idle. Round r+1 is
        always planned from the same state (rounds up to r-1 told, round r running: TPE's
        constant liar) and rounds are told in order, so the decisions do not depend on
        which task finishes first.
        """
        run, study = self.run_, self.study
        saved = run.store.load_checkpoint(run.job_id, "search")
        stats = run.phases["search"] = (
            PhaseStats.from_json(saved["stats"], resumed=False) if saved else PhaseStats()
        )
        t0 = time.perf_counter() - stats.wall_s
        if prefetched is not None:
            stats.task_lm.add(prefetched.usage)
            stats.faults.add(prefetched.faults)
        self._evaluator = run.evaluator()
        depth = 2 if self._can_pipeline() else 1
        inflight: deque[_Round] = deque()
        stop_reason = "completed"
        stopping = False

        def save() -> None:
            stats.wall_s = time.perf_counter() - t0
            run.store.save_checkpoint(run.job_id, "search", {"stats": stats.to_json()})

        while True:
            st = study.state()
            done = st.minibatch_done if run.plan.minibatch else st.full_done
            self._progress.told(done, {
                "best_score": None if st.best_params is None else st.best_score,
                "baseline_score": None if st.baseline is None else float(st.baseline.value),
            })
            if not stopping and run.cancelled():
                stop_reason, stopping = "cancelled", True
            if not stopping and run.budget.exhausted(run.total_usage()) and st.baseline is not None:
                stop_reason, stopping = "budget", True
            if not stopping and len(inflight) < depth:
                planned = self._plan_round(st, done, list(inflight))
                if planned == "budget":
                    stop_reason, stopping = "budget", True
                elif isinstance(planned, _Round):
                    inflight.append(self._launch(planned))
                    if len(inflight) < depth:
                        continue  # fill the pipeline before waiting on its oldest round
            if not inflight:
                break
            self._tell(inflight.popleft(), stats)
            save()
        # An error raised here leaves a round in flight; closing the executor stops its tasks.

        save()
        st = study.state()
        if st.baseline is None or st.best_params is None:
            raise OptimizationError("the search ended before the baseline program was evaluated")
        return self._result(st, stop_reason, start)

    def _can_pipeline(self) -> bool:
        """Whether two rounds may be in flight: the executor fills itself and takes tasks from
        several threads, and no budget needs each round's cost before the next is asked."""
        run = self.run_
        ex = run.executor
        return (
            run.opt.parallel_trials is None
            and ex.concurrent_submit
            and ex.capacity > 1
            and run.opt.max_lm_calls is None
            and run.opt.max_cost_usd is None
        )

    def _plan_round(self, st: SearchState, done: int, inflight: list[_Round]) -> _Round | str | None:
        """The next round from ``st`` (whose running trials include the rounds ``inflight``):
        a :class:`_Round`, None when nothing is left to start now, or ``"budget"``."""
        run, study = self.run_, self.study
        plan = run.plan
        space = study.space
        flying = {t.number for r in inflight for t in r.trials}
        # Trials in flight before a restart keep their batch, and so their shared minibatch.
        rerun = [t for t in st.running if t.number not in flying]
        picks: list[tuple[str, dict[str, Any]]] = []
        if plan.minibatch and not rerun:
            target = plan.expected_full_evals if done >= plan.num_trials else done // plan.full_eval_steps
            picked = {key for r in inflight for key, _ in r.picks}
            due = max(0, target - st.full_done - len(picked))
            picks = [p for p in st.next_full_evals(due + len(picked)) if p[0] not in picked][:due]
        batch = max(trial_batch(t) for t in rerun) if rerun else st.batches
        trials = rerun
        # A round holds the full evaluations now due and the next batch of trials; they are
        # independent, so unless DSPy's exact sequence was asked for (parallel_trials=1) they
        # are evaluated together.
        if not rerun and (not picks or run.opt.parallel_trials != 1):
            trials = []
            baseline_flying = any(trial_kind(t) == TrialKind.BASELINE for r in inflight for t in r.trials)
            if st.baseline is None and not baseline_flying:
                trials.append(study.ask(TrialKind.BASELINE, batch, space.baseline_params()))
            counted = self._counted_kind()
            ahead = sum(1 for r in inflight for t in r.trials if trial_kind(t) == counted)
            flying_now = len(flying) + len(trials)
            k = self._batch_size(st, done + ahead, flying_now) if done + ahead < plan.num_trials else 0
            room = run.budget.room_calls(run.total_usage())
            if k and math.isfinite(room):
                per_example = self._eval_calls / self._eval_examples if self._eval_examples else 1.0
                per_trial = plan.minibatch_size if plan.minibatch else len(plan.val_ids)
                k = min(k, int(room // max(1.0, per_example * per_trial)))
                if k < 1 and st.baseline is not None and not picks:
                    return "budget"
            trials += [study.ask(counted, batch) for _ in range(max(0, k))]
        if not picks and not trials:
            return None
        return _Round(batch, picks, trials)

    def _counted_kind(self) -> str:
        """The trials that count towards ``num_trials``."""
        return TrialKind.MINIBATCH if self.run_.plan.minibatch else TrialKind.FULL

    def _launch(self, rnd: _Round) -> _Round:
        """Build the round's evaluation requests and start evaluating them on their own thread."""
        run, study = self.run_, self.study
        plan, space = run.plan, study.space
        val_ids = list(plan.val_ids)
        mb_ids = (
            rng_for(run.seed, "minibatch", rnd.batch).sample(val_ids, plan.minibatch_size)
            if plan.minibatch
            else val_ids
        )
        # Full evaluations become trials when told; number them after everything asked so far.
        first = max(self._next_label, len(study.trials()) + 1)
        self._next_label = first + len(rnd.picks)
        requests = [
            EvalRequest(space.candidate(params), val_ids, trial=first + j)
            for j, (_, params) in enumerate(rnd.picks)
        ]
        for j, t in enumerate(rnd.trials):
            kind = trial_kind(t) or TrialKind.MINIBATCH
            ids = mb_ids if kind == TrialKind.MINIBATCH else val_ids
            requests.append(EvalRequest(space.candidate(t.params), ids, trial=t.number + 1))
            if kind == self._counted_kind():
                rnd.counted.add(len(rnd.picks) + j)
            bus.emit("dspy.optimization.trial_start", trial=t.number + 1, kind=kind,
                     candidate=space.key(t.params))
        evaluator, progress = self._evaluator, self._progress

        def evaluate() -> list[EvaluationResult]:
            with span("dmipro.trial", job_id=run.job_id, batch=rnd.batch,
                      trial=",".join(str(r.trial) for r in requests)):
                return evaluate_unique(evaluator, requests, lambda j: progress.finished(rnd, j))

        progress.add(rnd)
        rnd.future = run._background(evaluate, "dmipro-trials")
        return rnd

    def _tell(self, rnd: _Round, stats: PhaseStats) -> None:
        """Wait for a round's scores and record them, in the order the round was asked."""
        run, study = self.run_, self.study
        space = study.space
        results = rnd.future.result()
        self._progress.remove(rnd)
        stats.depth += len(run.predictors)
        for (key, params), res in zip(rnd.picks, results, strict=False):
            stats.task_lm.add(res.usage)
            stats.faults.add(res.faults)
            study.add_full(params, res.score, rnd.batch)
            bus.emit(
                "dspy.optimization.trial_complete",
                trial=len(study.trials()),
                kind=TrialKind.FULL,
                score=res.score,
                candidate=key,
            )
        for t, res in zip(rnd.trials, results[len(rnd.picks) :], strict=True):
            if trial_kind(t) == TrialKind.BASELINE and res.n and res.errors == res.n:
                first_error = next(r.error for r in res.results if r.error)
                raise OptimizationError(
                    f"the program failed on every validation example; first error: {first_error}"
                )
            stats.task_lm.add(res.usage)
            stats.faults.add(res.faults)
            self._eval_calls += res.usage.calls
            self._eval_examples += res.n - res.cached
            study.tell(t.number, res.score)
            bus.emit(
                "dspy.optimization.trial_complete",
                trial=t.number + 1,
                kind=trial_kind(t),
                score=res.score,
                candidate=space.key(t.params),
            )

    def _batch_size(self, st: SearchState, done: int, asked: int) -> int:
        """Trials to ask at once: ``parallel_trials``, or enough to fill the executor.

        By default the batch also covers every trial TPE still samples at random (its
        first ``n_startup`` completed trials, the baseline included, less the ``asked``
        trials in flight or in this round): those choices do not depend on results, so
        evaluating them together loses nothing. ``done`` counts the trials in flight.
        """
        plan, opt, n_startup = self.run_.plan, self.run_.opt, self.study.n_startup_trials
        remaining = plan.num_trials - done
        if opt.parallel_trials is not None:
            k = opt.parallel_trials
        else:
            per_trial = plan.minibatch_size if plan.minibatch else len(plan.val_ids)
            startup_left = n_startup - st.completed - asked
            k = max(1, math.ceil(self.run_.executor.capacity / per_trial), startup_left)
        return max(1, min(k, remaining))

    def _result(self, st: SearchState, stop_reason: str, start: float) -> OptimizationResult:
        run, study = self.run_, self.study
        space = study.space
        assert st.best_params is not None and st.baseline is not None
        best_candidate = space.candidate(st.best_params)
        program = apply_candidate(run.runtime.fresh_program(), best_candidate)
        trial_logs: dict[int, dict[str, Any]] = {}
        full: list[dict[str, Any]] = []
        mb: list[dict[str, Any]] = []
        for t in study.trials():
            if t.value is None:
                continue
            kind = trial_kind(t)
            entry = {
                "kind": kind,
                "score": float(t.value),
                "params": dict(t.params),
                "candidate": space.key(t.params),
                "full_eval": kind != TrialKind.MINIBATCH,
            }
            trial_logs[t.number + 1] = entry
            (mb if kind == TrialKind.MINIBATCH else full).append(entry)
        candidate_programs = [
            {
                "score": e["score"],
                "full_eval": True,
                "candidate": e["candidate"],
                "program": apply_candidate(run.runtime.fresh_program(), space.candidate(e["params"])),
            }
            for e in sorted(full, key=lambda e: -e["score"])
        ]
        mb_candidate_programs = [
            {"score": e["score"], "full_eval": False, "candidate": e["candidate"], "params": e["params"]}
            for e in sorted(mb, key=lambda e: -e["score"])
        ]
        done = st.minibatch_done if run.plan.minibatch else st.full_done
        return OptimizationResult(
            job_id=run.job_id,
            program=program,
            best_candidate=best_candidate,
            baseline_score=float(st.baseline.value),
            best_score=st.best_score,
            trials=done,
            stop_reason=stop_reason,
            phases=dict(run.phases),
            trial_logs=trial_logs,
            candidate_programs=candidate_programs,
            mb_candidate_programs=mb_candidate_programs,
            wall_s=time.perf_counter() - start,
            val_ids=list(run.plan.val_ids),
            trial_candidates={n: space.candidate(e["params"]) for n, e in trial_logs.items()},
        )


def evaluate_unique(
    evaluator: Evaluator, requests: list[EvalRequest], on_done: Callable[[int], None] | None = None
) -> list[EvaluationResult]:
    """Evaluate a batch; identical candidates on identical examples are evaluated once.

    ``on_done(j)`` is called for request ``j`` (an index into ``requests``) as soon as its
    evaluation has finished, while the rest of the batch still runs.
    """
    unique: dict[tuple[str, tuple[int, ...]], int] = {}
    todo: list[EvalRequest] = []
    index = []
    for req in requests:
        key = (fingerprint(req.candidate), tuple(req.example_ids or ()))
        if key not in unique:
            unique[key] = len(todo)
            todo.append(req)
        index.append(unique[key])
    copies: dict[int, list[int]] = {}
    for j, i in enumerate(index):
        copies.setdefault(i, []).append(j)

    def finished(u: int) -> None:
        if on_done is not None:
            for j in copies[u]:
                on_done(j)

    results = evaluator.evaluate_many(todo, finished)
    seen: set[int] = set()
    out = []
    for i in index:
        res = results[i]
        if i in seen:  # a duplicate costs nothing: report it as cached
            res = EvaluationResult(res.score, res.results, Usage(), res.wall_s, res.n)
        seen.add(i)
        out.append(res)
    return out

