"""Phase 3 of MIPROv2: the Bayesian search over instruction × demo-set candidates.

:class:`SearchPhase` drives one job's Optuna :class:`~dmipro.teleprompt.search.Study`
for its :class:`~dmipro.teleprompt.coordinator.Coordinator`, as
:class:`~dmipro.propose.proposer.GroundedProposer` does phase 2: it asks batches of
trials (TPE, constant liar), evaluates them on a minibatch the batch shares, tells the
scores, evaluates the best minibatch candidates on the full valset every
``minibatch_full_eval_steps`` trials, and stops on the trial count, the LM budget or a
cancel. The study lives in the job database, so a search resumed after a crash re-runs
the trials in flight and carries on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
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



class SearchPhase:
    """Phase 3 of one job over its coordinator's executor, store and plan; see the module docstring."""

    def __init__(self, run: Coordinator, study: Study) -> None:
        self.run_ = run
        self.study = study

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
        k = self._batch_size(SearchState(), 0)
        kind = TrialKind.MINIBATCH if run.plan.minibatch else TrialKind.FULL
        study.ask(TrialKind.BASELINE, 0, study.space.baseline_params())
        for _ in range(k):
            study.ask(kind, 0)

    def run(self, start: float, prefetched: EvaluationResult | None = None) -> OptimizationResult:
        """Search until the trials, the budget or a cancel end it; the result of the best candidate."""
        run, study = self.run_, self.study
        saved = run.store.load_checkpoint(run.job_id, "search")
        stats = run.phases["search"] = (
            PhaseStats.from_json(saved["stats"], resumed=False) if saved else PhaseStats()
        )
        t0 = time.perf_counter() - stats.wall_s
        plan = run.plan
        space = study.space
        evaluator = run.evaluator()
        if prefetched is not None:
            stats.task_lm.add(prefetched.usage)
            stats.faults.add(prefetched.faults)
        val_ids = list(plan.val_ids)
        stop_reason = "completed"
        eval_calls = eval_examples = 0

        def save() -> None:
            stats.wall_s = time.perf_counter() - t0
            run.store.save_checkpoint(run.job_id, "search", {"stats": stats.to_json()})

        while True:
            st = study.state()
            done = st.minibatch_done if plan.minibatch else st.full_done
            scores = {
                "best_score": None if st.best_params is None else st.best_score,
                "baseline_score": None if st.baseline is None else float(st.baseline.value),
            }
            run.progress("search", trials_done=done, trials_total=plan.num_trials, **scores)
            if run.cancelled():
                stop_reason = "cancelled"
                break
            usage = run.total_usage()
            if run.budget.exhausted(usage) and st.baseline is not None:
                stop_reason = "budget"
                break

            # One round: the trials in flight before a restart; or the full evaluations now
            # due and the next batch of trials. They are independent, so unless DSPy's exact
            # sequence was asked for (parallel_trials=1) they are evaluated together.
            rerun = list(st.running)
            picks: list[tuple[str, dict[str, Any]]] = []
            if plan.minibatch and not rerun:
                target = plan.expected_full_evals if done >= plan.num_trials else done // plan.full_eval_steps
                picks = st.next_full_evals(max(0, target - st.full_done))
            # Trials in flight keep their batch, and so their shared minibatch.
            batch = max(trial_batch(t) for t in rerun) if rerun else st.batches
            trials = rerun
            if not rerun and (not picks or run.opt.parallel_trials != 1):
                trials = []
                if st.baseline is None:
                    trials.append(study.ask(TrialKind.BASELINE, batch, space.baseline_params()))
                k = self._batch_size(st, done) if done < plan.num_trials else 0
                room = run.budget.room_calls(usage)
                if k and math.isfinite(room):
                    per_example = eval_calls / eval_examples if eval_examples else 1.0
                    per_trial = plan.minibatch_size if plan.minibatch else len(val_ids)
                    k = min(k, int(room // max(1.0, per_example * per_trial)))
                    if k < 1 and st.baseline is not None and not picks:
                        stop_reason = "budget"
                        break
                kind = TrialKind.MINIBATCH if plan.minibatch else TrialKind.FULL
                trials += [study.ask(kind, batch) for _ in range(max(0, k))]
            if not picks and not trials:
                break

            mb_ids = (
                rng_for(run.seed, "minibatch", batch).sample(val_ids, plan.minibatch_size)
                if plan.minibatch
                else val_ids
            )
            first_full = len(study.trials()) + 1
            requests = [
                EvalRequest(space.candidate(params), val_ids, trial=first_full + j)
                for j, (_, params) in enumerate(picks)
            ]
            for t in trials:
                kind = trial_kind(t) or TrialKind.MINIBATCH
                ids = mb_ids if kind == TrialKind.MINIBATCH else val_ids
                requests.append(EvalRequest(space.candidate(t.params), ids, trial=t.number + 1))
                bus.emit(
                    "dspy.optimization.trial_start",
                    trial=t.number + 1,
                    kind=kind,
                    candidate=space.key(t.params),
                )
            counted_kind = TrialKind.MINIBATCH if plan.minibatch else TrialKind.FULL
            counted = {len(picks) + j for j, t in enumerate(trials)
                       if (trial_kind(t) or TrialKind.MINIBATCH) == counted_kind}
            finished = self._count_finished(done, counted, scores)
            with span(
                "dmipro.trial",
                job_id=run.job_id,
                batch=batch,
                trial=",".join(str(r.trial) for r in requests),
            ):
                results = evaluate_unique(evaluator, requests, finished)
            stats.depth += len(run.predictors)

            for (key, params), res in zip(picks, results, strict=False):
                stats.task_lm.add(res.usage)
                stats.faults.add(res.faults)
                study.add_full(params, res.score, batch)
                bus.emit(
                    "dspy.optimization.trial_complete",
                    trial=len(study.trials()),
                    kind=TrialKind.FULL,
                    score=res.score,
                    candidate=key,
                )
            for t, res in zip(trials, results[len(picks) :], strict=True):
                if trial_kind(t) == TrialKind.BASELINE and res.n and res.errors == res.n:
                    first_error = next(r.error for r in res.results if r.error)
                    raise OptimizationError(
                        f"the program failed on every validation example; first error: {first_error}"
                    )
                stats.task_lm.add(res.usage)
                stats.faults.add(res.faults)
                eval_calls += res.usage.calls
                eval_examples += res.n - res.cached
                study.tell(t.number, res.score)
                bus.emit(
                    "dspy.optimization.trial_complete",
                    trial=t.number + 1,
                    kind=trial_kind(t),
                    score=res.score,
                    candidate=space.key(t.params),
                )
            save()

        save()
        st = study.state()
        if st.baseline is None or st.best_params is None:
            raise OptimizationError("the search ended before the baseline program was evaluated")
        return self._result(st, stop_reason, start)

    def _count_finished(self, done: int, counted: set[int], scores: dict[str, Any]) -> Callable[[int], None]:
        """A callback reporting each trial of the batch done as soon as its evaluation is, not at the
        end of the batch (requests ``counted`` are the trials that count towards ``trials_done``)."""
        finished = 0

        def on_done(j: int) -> None:
            nonlocal finished
            if j in counted:
                finished += 1
                self.run_.progress("search", trials_done=done + finished,
                                   trials_total=self.run_.plan.num_trials, **scores)

        return on_done

    def _batch_size(self, st: SearchState, done: int) -> int:
        """Trials to ask at once: ``parallel_trials``, or enough to fill the executor.

        By default the batch also covers every trial TPE still samples at random (its
        first ``n_startup`` completed trials, the baseline included): those choices do
        not depend on results, so evaluating them together loses nothing.
        """
        plan, opt, n_startup = self.run_.plan, self.run_.opt, self.study.n_startup_trials
        remaining = plan.num_trials - done
        if opt.parallel_trials is not None:
            k = opt.parallel_trials
        else:
            per_trial = plan.minibatch_size if plan.minibatch else len(plan.val_ids)
            startup_left = n_startup - st.completed - (0 if st.baseline is not None else 1)
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

