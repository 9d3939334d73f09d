"""The MIPROv2 coordinator: runs or resumes the three phases of one job.

It holds no search state of its own. Finished phases are checkpoints in the job store;
the search is an Optuna study in the job database; per-example scores are cached by
candidate fingerprint. A coordinator started again on the same job — after a crash, a
redelivered Celery task, a second ``dmipro optimize --job-id`` — skips finished phases,
re-runs the trials that were in flight and carries on.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from dmipro.config import get_settings
from dmipro.db import database_gone
from dmipro.errors import DmiproError, LMError, OptimizationError
from dmipro.evaluation import EvaluationResult, Evaluator, StoreScoreCache
from dmipro.events import bus, correlate
from dmipro.executor_adapters.base import ExecutorAdapter
from dmipro.jobs._limits import task_deadlines
from dmipro.jobs.candidate import Candidate
from dmipro.jobs.plan import RunPlan, plan_demo_sets
from dmipro.jobs.runtime import JobRuntime, plan_for
from dmipro.jobs.store import JobState, JobStore
from dmipro.lm._shared_cache import shared_cache_stats
from dmipro.lm.faults import FaultCounts
from dmipro.lm.ratelimit import health
from dmipro.lm.usage import Usage
from dmipro.propose.proposer import GroundedProposer
from dmipro.registry import Registry
from dmipro.storage import ProgramRecord
from dmipro.storage.database import DatabaseProgramStore
from dmipro.storage.directory import save_program_file
from dmipro.tasks import bootstrap as _bootstrap_body  # noqa: F401  (registers bootstrap_demo_set, shipped here)
from dmipro.teleprompt.result import OptimizationResult, PhaseStats
from dmipro.teleprompt.search import SearchSpace, Study
from dmipro.teleprompt.search_phase import Budget, SearchPhase
from dmipro.tracing import span

__all__ = ["Coordinator", "ProgressFn"]

log = logging.getLogger(__name__)

T = TypeVar("T")
ProgressFn = Callable[[dict[str, Any]], None]
"""Receives progress dicts: phase, trials_done, trials_total, best_score, lm_calls, tokens."""


class Coordinator:
    """Runs one job's MIPROv2 phases over an executor; see the module docstring."""

    PHASES = ("bootstrap", "propose", "search")

    def __init__(
        self,
        job_id: str,
        runtime: JobRuntime,
        executor: ExecutorAdapter,
        *,
        store: JobStore | None = None,
        on_progress: ProgressFn | None = None,
        program_path: Path | None = None,
    ) -> None:
        self.job_id = job_id
        self.program_path = program_path
        self.runtime = runtime
        self.executor = executor
        self.store = store or JobStore()
        self.on_progress = on_progress
        self.opt = runtime.spec.optimizer
        self.seed = self.opt.seed
        self.phases: dict[str, PhaseStats] = {}
        self.budget = Budget(self.opt.max_lm_calls, self.opt.max_cost_usd)
        # Every evaluation's LM errors, for max_errors over the whole search.
        self._lm_errors = FaultCounts()
        # The LM error that failed a task (its counts died with the task).
        self._fatal = FaultCounts()

    # -- helpers -------------------------------------------------------------------
    def progress(self, phase: str, **data: Any) -> None:
        usage = self.total_usage()
        data.update(lm_calls=usage.calls, tokens=usage.tokens, cost_usd=usage.cost_usd)
        data.update(self._fault_progress())
        self.store.set_progress(self.job_id, phase=phase, **data)
        if self.on_progress is not None:
            try:
                self.on_progress({"phase": phase, **data})
            except Exception:
                log.exception("progress callback failed")

    def _fault_progress(self) -> dict[str, Any]:
        """The run's LM fault counts, and what holds this process's LM calls back right now."""
        faults = FaultCounts().add(self._fatal)
        for name, p in self.phases.items():
            if name != "search":
                faults.add(p.faults)
        # The evaluator's tally also holds evaluations that raised (and so never reached the
        # search's stats); a resumed search's stats hold what earlier coordinators counted.
        search = self.phases["search"].faults if "search" in self.phases else FaultCounts()
        tally = self._lm_errors

        def weight(f: FaultCounts) -> int:
            return f.lm_errors + f.retries + f.rate_limited

        faults.add(tally if weight(tally) >= weight(search) else search)
        return {
            **faults.summary(),
            "rate_limited": faults.rate_limited,
            "circuit_opens": faults.circuit_opens,
            "lm_health": health() or None,
        }

    def total_usage(self) -> Usage:
        total = Usage()
        for p in self.phases.values():
            total.add(p.task_lm).add(p.prompt_lm)
        return total

    def cancelled(self) -> bool:
        return self.store.cancel_requested(self.job_id)

    def _watch(self) -> None:
        """Give a remote executor the job's task deadlines and cancel flag (``RemoteAdapter.watch``)."""
        watch = getattr(self.executor, "watch", None)
        if watch is None:
            return

        program = self.runtime.fresh_program()
        watch(deadlines=task_deadlines(self.runtime.spec, predictors=len(program.named_predictors()),
                                       train_size=len(self.runtime.examples.get("train", []))),
              cancelled=self.cancelled, job_id=self.job_id)

    # -- the run -------------------------------------------------------------------
    def run(self) -> OptimizationResult:
        """Run (or resume) the job to the end; the job row says how it ended."""
        start = time.perf_counter()
        self.store.start(self.job_id, self.executor.name)
        self._watch()
        with (
            correlate(job_id=self.job_id),
            span("dmipro.optimize", job_id=self.job_id, executor=self.executor.name, optimizer="MIPROv2"),
        ):
            bus.emit(
                "dspy.optimization.start",
                optimizer="MIPROv2",
                executor=self.executor.name,
                settings=self.opt.model_dump(mode="json"),
            )
            try:
                with self.store.heartbeat(self.job_id):  # a silent row means a dead coordinator
                    result = self._run(start)
                    result.lm_cache = self._lm_cache_stats()
                    self._save(result)
            except BaseException as exc:
                if self.executor.remote and database_gone(exc):
                    raise  # not the job's failure: its worker resumes it when the database is back
                message = str(exc) if isinstance(exc, DmiproError) else f"{type(exc).__name__}: {exc}"
                if isinstance(exc, LMError):
                    self._fatal.record_failure(exc)
                    self._fatal.record_gave_up(exc)
                try:  # the counts say what the provider did before the job failed
                    self.store.set_progress(self.job_id, **self._fault_progress())
                except Exception:
                    log.exception("could not record the LM fault counts of failed job %s", self.job_id)
                ended = JobState.CANCELLED if self.cancelled() else JobState.FAILED
                self.store.finish(self.job_id, ended, error=message)
                bus.emit("dspy.optimization.error", error=message, error_type=type(exc).__name__)
                raise
            state = JobState.CANCELLED if result.stop_reason == "cancelled" else JobState.SUCCEEDED
            self.store.finish(self.job_id, state, result=result.to_json())
            bus.emit(
                "dspy.optimization.complete", **{k: v for k, v in result.summary().items() if k != "job_id"}
            )
        return result

    def _run(self, start: float) -> OptimizationResult:
        program = self.runtime.fresh_program()
        self.predictors = [name for name, _ in program.named_predictors()]
        self.plan = self._plan(program)
        self.progress("bootstrap", trials_done=0, trials_total=self.plan.num_trials)
        baseline = self._prefetch_baseline(program)
        study = self._background(self._open_study, "dmipro-study")
        try:
            return self._search_after_phases(study, baseline, start)
        finally:
            # However the run ended, close the study's storage once it is open (now, or when the
            # opening thread finishes): an app running optimizations one after another must not
            # keep a database connection per run.
            study.add_done_callback(lambda f: None if f.exception() else f.result().close())

    def _search_after_phases(self, study: Future[Study], baseline: Future[EvaluationResult] | None,
                             start: float) -> OptimizationResult:
        try:
            demo_sets = self._phase("bootstrap", self._bootstrap)["demo_sets"]
            proposer = GroundedProposer(
                self.job_id,
                self.runtime,
                self.executor,
                predictors=self.predictors,
                num_instructions=self.plan.num_instruct_candidates,
            )
            proposals = self._phase("propose", lambda stats: proposer.propose(stats, demo_sets))
        finally:
            prefetched = baseline.result() if baseline is not None else None
        space = SearchSpace(
            predictors=tuple(self.predictors),
            instructions=proposals["instructions"],
            demo_sets=None if self.plan.zeroshot else demo_sets,
        )
        opened = study.result()
        opened.use(space)
        with span("dmipro.phase.search", job_id=self.job_id):
            return SearchPhase(self, opened).run(start, prefetched)

    @staticmethod
    def _background(fn: Callable[[], T], name: str) -> Future[T]:
        """Run ``fn`` on its own thread, in this context (trace, correlation ids)."""
        context = contextvars.copy_context()
        future: Future[T] = Future()

        def run() -> None:
            try:
                future.set_result(context.run(fn))
            except BaseException as exc:
                future.set_exception(exc)

        threading.Thread(target=run, name=name, daemon=True).start()
        return future

    def _open_study(self) -> Study:
        """Open the job's study and ask its first batch (done while phases 1 and 2 run)."""
        study = self._study()
        SearchPhase(self, study).ask_first_batch()
        return study

    def _study(self) -> Study:
        """The job's study, shaped by the plan (its contents arrive after phase 2)."""
        n_sets = self.plan.num_fewshot_candidates
        shape = SearchSpace.shaped(
            tuple(self.predictors),
            instructions=min(self.plan.num_instruct_candidates, n_sets),
            demo_sets=None if self.plan.zeroshot else n_sets,
        )
        url = self.store.url
        spec = self.runtime.spec
        attrs: dict[str, Any] = {"job": self.job_id, "program": spec.program, "metric": spec.metric}
        attrs["lm"] = spec.lm.model
        attrs["settings"] = self.opt.model_dump(mode="json")  # what optuna-dashboard shows an operator
        return Study(f"dmipro:{self.job_id}", url, seed=self.seed, space=shape, attrs=attrs)

    def evaluator(self) -> Evaluator:
        return Evaluator(
            self.job_id,
            self.executor,
            split="val",
            size=len(self.runtime.split("val")),
            chunk_size=self.runtime.spec.executor.chunk_size,
            cache=StoreScoreCache(self.store, self.job_id, "val"),
            max_errors=self.opt.max_errors,
            lm_errors=self._lm_errors,
        )

    def _prefetch_baseline(self, program: Any) -> Future[EvaluationResult] | None:
        """Start the baseline's full evaluation now, alongside bootstrap and proposal.

        It depends on nothing those phases produce (instruction 0 is the original, demo
        set 0 is empty), and they leave most of the executor idle while their few calls
        wait on the LM. The scores land in the evaluation cache, so the search's baseline
        trial costs nothing; the decisions are the same as evaluating it in phase 3.
        """
        # Not on a broker: the baseline's tasks would queue ahead of bootstrap's, on the critical path.
        if not self.executor.concurrent_submit or self.executor.remote or self.executor.capacity < 2:
            return None
        if self.store.load_checkpoint(self.job_id, "search") is not None:
            return None  # a resumed search: the baseline was evaluated (or is cached) already
        candidate: Candidate = {
            name: {
                "instruction": pred.signature.instructions,
                **({} if self.plan.zeroshot else {"demos": []}),
            }
            for name, pred in program.named_predictors()
        }
        evaluator = self.evaluator()
        ids = list(self.plan.val_ids)
        return self._background(lambda: evaluator(candidate, ids, trial=1), "dmipro-baseline")

    def _plan(self, program: Any) -> RunPlan:
        return plan_for(self.runtime)

    def _phase(self, name: str, body: Callable[[PhaseStats], dict[str, Any]]) -> dict[str, Any]:
        saved = self.store.load_checkpoint(self.job_id, name)
        if saved is not None:
            self.phases[name] = PhaseStats.from_json(saved["stats"], resumed=True)
            return saved
        if self.budget.exhausted(self.total_usage()):
            raise OptimizationError(
                f"the LM budget ran out before the {name} phase; raise max_lm_calls or max_cost_usd"
            )
        stats = self.phases[name] = PhaseStats()
        t0 = time.perf_counter()
        with span(f"dmipro.phase.{name}", job_id=self.job_id):
            data = body(stats)
        stats.wall_s = time.perf_counter() - t0
        data["stats"] = stats.to_json()
        self.store.save_checkpoint(self.job_id, name, data)
        return data

    # -- phase 1 ---------------------------------------------------------------------
    def _bootstrap(self, stats: PhaseStats) -> dict[str, Any]:
        plans = plan_demo_sets(
            self.plan.num_fewshot_candidates,
            max_bootstrapped=self.plan.bootstrap_max_bootstrapped,
            max_labeled=self.plan.bootstrap_max_labeled,
            seed=self.seed,
        )
        sets: dict[int, dict[str, list[dict[str, Any]]]] = {0: {n: [] for n in self.predictors}}
        payloads = [
            {
                "job": self.job_id,
                "index": p.index,
                "kind": p.kind,
                "shuffle_seed": p.shuffle_seed,
                "max_bootstrapped": p.max_bootstrapped,
                "max_labeled": p.max_labeled,
                "max_rounds": self.opt.max_rounds,
                "metric_threshold": self.opt.metric_threshold,
                "max_errors": self.opt.max_errors,
            }
            for p in plans
            if p.kind != "zeroshot"
        ]
        for res in self.executor.gather("bootstrap_demo_set", payloads, stats.task_lm, stats.faults):
            sets[int(res["index"])] = res["demos"]
            depth = res.get("depth")  # a speculative bootstrap's chain is shorter than its calls
            calls = Usage.from_json(res.get("usage")).calls
            stats.depth = max(stats.depth, int(depth) if isinstance(depth, int) else calls)
        demo_sets = {name: [sets[i][name] for i in range(len(plans))] for name in self.predictors}
        bus.emit(
            "dspy.optimization.bootstrap_complete",
            num_sets=len(plans),
            demos_per_set=[sum(len(sets[i][n]) for n in self.predictors) for i in range(len(plans))],
        )
        self.progress("propose")
        return {"demo_sets": demo_sets}

    def _lm_cache_stats(self) -> dict[str, Any] | None:
        """The job's shared LM cache counters, when one of its LMs uses ``cache: shared``."""
        spec = self.runtime.spec
        if "shared" not in (spec.lm.cache, spec.effective_prompt_lm.cache):
            return None

        try:
            return shared_cache_stats(self.job_id, get_settings().broker_url)
        except Exception as exc:  # the run succeeded; say the numbers are missing, and why
            log.warning("cannot read the shared LM cache counters: %s", exc)
            return {"error": f"{type(exc).__name__}: {exc}"}

    # -- result ----------------------------------------------------------------------
    def _save(self, result: OptimizationResult) -> None:
        """Write the best program as DSPy's own ``program.save()`` JSON."""
        if self.program_path is not None:  # the caller's own choice of file (--out)
            path = save_program_file(result.program, self.program_path)
        else:
            path = save_program_file(result.program, Path("programs", f"{self.job_id}.json"),
                                     root=get_settings().home)
        result.program_path = str(path)
        if not self.runtime.in_process:  # in-process objects have no reference to rebuild them from
            result.program_id = self._store_program(result)
        if self.runtime.spec.registration is not None and not self.runtime.in_process:
            result.registered = self._register(result)

    def _record(self, result: OptimizationResult) -> Any:
        spec = self.runtime.spec
        return ProgramRecord.from_program(
            result.program,
            program_ref=spec.program,
            job_id=self.job_id,
            optimizer=spec.optimizer.model_dump(mode="json"),
            baseline_score=result.baseline_score,
            best_score=result.best_score,
            lm=spec.lm.model_dump(mode="json", exclude_none=True),
            datasets=self.runtime.data_fingerprints(),
            history=[{"trial": k, **v} for k, v in sorted(result.trial_logs.items())],
        )

    def _store_program(self, result: OptimizationResult) -> str:
        """Save the best program in the job database's program store, once per job; its id.

        The file under ``DMIPRO_HOME`` is on the coordinator's machine only; the database is
        what every client of the job reaches (``JobHandle.result()`` reads it from there).
        """
        programs = DatabaseProgramStore(self.store.url)
        saved = programs.list(job_id=self.job_id)
        if saved:  # a resumed coordinator that saved it before it was stopped
            return saved[0].id
        return programs.save(self._record(result))

    def _register(self, result: OptimizationResult) -> dict[str, Any]:
        """Register the best program under the job's ``register.name``, once per job."""
        spec = self.runtime.spec
        assert spec.registration is not None
        registry = Registry(self.store.url)
        name = spec.registration.name
        try:
            existing = [v for v in registry.versions(name) if v.job_id == self.job_id]
        except DmiproError:  # the name does not exist yet
            existing = []
        if existing:  # a resumed coordinator that registered before it was stopped
            info = existing[-1]
            return {"name": name, "version": info.version, "deployed": info.deployed}
        info = registry.register(name, self._record(result), deploy=spec.registration.deploy)
        return {"name": name, "version": info.version, "deployed": info.deployed}

