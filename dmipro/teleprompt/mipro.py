"""``dmipro.MIPROv2``: DSPy's MIPROv2, run as a job over any executor.

It takes the same arguments as ``dspy.MIPROv2`` (plus ``executor``, ``parallel_trials``
and a budget), so switching is a one-line change::

    optimizer = dmipro.MIPROv2(metric=exact_match, auto="light", executor="thread")
    optimized = optimizer.compile(program, trainset=trainset, valset=valset)
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from dmipro.errors import OptimizationError
from dmipro.executor_adapters import ExecutorAdapter, make_executor
from dmipro.jobs.runtime import forget_runtime, get_runtime, register_runtime
from dmipro.jobs.spec import ExecutorConfig, JobSpec, LMConfig, OptimizerConfig
from dmipro.jobs.store import JobState, JobStore
from dmipro.refs import ref_of
from dmipro.teleprompt._coordinator import Coordinator, ProgressFn
from dmipro.teleprompt.result import OptimizationResult
from dmipro.teleprompt.teleprompt import Teleprompter

__all__ = ["MIPROv2", "run_job"]

log = logging.getLogger(__name__)


def _attach(result: OptimizationResult) -> Any:
    """The optimized module, carrying what DSPy's MIPROv2 attaches plus dmipro's stats."""
    program = result.program
    program.score = result.best_score
    program.trial_logs = result.trial_logs
    program.candidate_programs = result.candidate_programs
    program.mb_candidate_programs = result.mb_candidate_programs
    program.prompt_model_total_calls = sum(p.prompt_lm.calls for p in result.phases.values())
    program.total_calls = sum(p.task_lm.calls for p in result.phases.values())
    program.stats = {
        "baseline_score": result.baseline_score,
        "stop_reason": result.stop_reason,
        "phases": {k: v.to_json() for k, v in result.phases.items()},
        **result.summary(),
    }
    program.optimization = result
    return program


class MIPROv2(Teleprompter):
    """MIPROv2 with DSPy's arguments and defaults; tasks go to ``executor``."""

    def __init__(
        self,
        metric: Any,
        prompt_model: Any = None,
        task_model: Any = None,
        teacher_settings: dict[str, Any] | None = None,
        max_bootstrapped_demos: int = 4,
        max_labeled_demos: int = 4,
        auto: Literal["light", "medium", "heavy"] | None = "light",
        num_candidates: int | None = None,
        num_threads: int | None = None,
        max_errors: int | None = None,
        seed: int = 9,
        init_temperature: float = 1.0,
        verbose: bool = False,
        track_stats: bool = True,
        log_dir: str | None = None,
        metric_threshold: float | None = None,
        *,
        executor: str | ExecutorAdapter | None = None,
        parallel_trials: int | None = None,
        max_lm_calls: int | None = None,
        max_cost_usd: float | None = None,
        name: str = "mipro",
    ) -> None:
        import dspy

        if auto not in {None, "light", "medium", "heavy"}:
            raise OptimizationError(f"auto must be None, light, medium or heavy, not {auto!r}")
        self.metric = metric
        self.task_model = task_model or dspy.settings.lm
        self.prompt_model = prompt_model or dspy.settings.lm
        if self.task_model is None or self.prompt_model is None:
            raise OptimizationError(
                "no LM: pass task_model/prompt_model or call dspy.configure(lm=...) first"
            )
        self.teacher_settings = teacher_settings or {}
        self.max_bootstrapped_demos = max_bootstrapped_demos
        self.max_labeled_demos = max_labeled_demos
        self.auto = auto
        self.num_candidates = num_candidates
        self.num_threads = num_threads
        self.max_errors = max_errors
        self.seed = seed
        self.init_temperature = init_temperature
        self.metric_threshold = metric_threshold
        self.track_stats = track_stats
        self.executor = executor
        self.parallel_trials = parallel_trials
        self.max_lm_calls = max_lm_calls
        self.max_cost_usd = max_cost_usd
        self.name = name

    def compile(  # type: ignore[override]
        self,
        student: Any,
        *,
        trainset: list[Any],
        teacher: Any = None,
        valset: list[Any] | None = None,
        num_trials: int | None = None,
        max_bootstrapped_demos: int | None = None,
        max_labeled_demos: int | None = None,
        seed: int | None = None,
        minibatch: bool = True,
        minibatch_size: int = 35,
        minibatch_full_eval_steps: int = 5,
        program_aware_proposer: bool = True,
        data_aware_proposer: bool = True,
        view_data_batch_size: int = 10,
        tip_aware_proposer: bool = True,
        fewshot_aware_proposer: bool = True,
        requires_permission_to_run: bool | None = None,
        provide_traceback: bool | None = None,
        job_id: str | None = None,
        on_progress: ProgressFn | None = None,
    ) -> Any:
        """Optimize ``student``; returns a new module with ``score``, ``trial_logs``, ``candidate_programs``.

        ``seed=0`` is honoured (DSPy turns it into 9). Passing ``job_id`` of an earlier,
        interrupted compile resumes it.
        """
        if not trainset:
            raise OptimizationError("trainset is empty; MIPROv2 needs training examples")
        if valset is not None and len(valset) == 0:
            raise OptimizationError("valset is empty; pass None to split it off the trainset")
        if teacher is not None:
            raise OptimizationError(
                "a teacher program object is not supported; name one with optimizer.teacher in a job spec"
            )
        if self.auto is not None and num_trials is not None:
            raise OptimizationError(
                f"auto={self.auto!r} sets num_trials itself; pass auto=None to give num_trials={num_trials}"
            )
        try:
            optimizer = OptimizerConfig(
                auto=self.auto,
                seed=self.seed if seed is None else seed,
                num_candidates=self.num_candidates,
                num_trials=num_trials,
                max_bootstrapped_demos=self.max_bootstrapped_demos
                if max_bootstrapped_demos is None
                else max_bootstrapped_demos,
                max_labeled_demos=self.max_labeled_demos if max_labeled_demos is None else max_labeled_demos,
                metric_threshold=self.metric_threshold,
                max_errors=self.max_errors,
                minibatch=minibatch,
                minibatch_size=minibatch_size,
                minibatch_full_eval_steps=minibatch_full_eval_steps,
                program_aware_proposer=program_aware_proposer,
                data_aware_proposer=data_aware_proposer,
                tip_aware_proposer=tip_aware_proposer,
                fewshot_aware_proposer=fewshot_aware_proposer,
                view_data_batch_size=view_data_batch_size,
                init_temperature=self.init_temperature,
                parallel_trials=self.parallel_trials,
                max_lm_calls=self.max_lm_calls,
                max_cost_usd=self.max_cost_usd,
            )
        except ValidationError as exc:
            raise OptimizationError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None
        executor = self.executor or "thread"
        if isinstance(executor, ExecutorAdapter) and executor.remote or executor in ("celery", "rq"):
            raise OptimizationError(
                "compile() runs with in-process objects; for celery or rq submit a job spec "
                "(dmipro.submit) whose program and metric are importable references"
            )
        input_keys = sorted(trainset[0].inputs().keys())

        def records(examples: list[Any]) -> list[dict[str, Any]]:
            from dmipro.jobs.candidate import demo_dict

            return [demo_dict(e) for e in examples]

        def ref_or_placeholder(obj: Any, what: str) -> str:
            try:
                return ref_of(obj)
            except Exception:
                return f"inprocess:{what}"

        spec = JobSpec(
            name=self.name,
            program=ref_or_placeholder(type(student), "program"),
            metric=ref_or_placeholder(self.metric, "metric"),
            trainset=records(trainset),
            valset=records(valset) if valset is not None else None,
            input_keys=input_keys,
            lm=LMConfig(model=str(getattr(self.task_model, "model", "unknown"))),
            prompt_lm=LMConfig(model=str(getattr(self.prompt_model, "model", "unknown"))),
            optimizer=optimizer,
            executor=ExecutorConfig(
                backend="inline" if executor == "inline" else "thread",
                concurrency=getattr(executor, "capacity", None) or self.num_threads or 16,
            ),
        )
        store = JobStore()
        job_id = job_id or f"{self.name}-{uuid.uuid4().hex[:12]}"
        if store.find(job_id) is None:
            store.create(
                name=spec.name,
                spec=spec.model_dump(mode="json"),
                executor=spec.executor.backend,
                job_id=job_id,
            )
        runtime = register_runtime(
            job_id,
            spec,
            program=student,
            metric=self.metric,
            task_lm=self.task_model,
            prompt_lm=self.prompt_model,
        )
        owned = not isinstance(executor, ExecutorAdapter)
        ex = (
            executor
            if isinstance(executor, ExecutorAdapter)
            else make_executor(spec.executor.backend, spec.executor.concurrency)
        )
        try:
            result = Coordinator(job_id, runtime, ex, store=store, on_progress=on_progress).run()
        finally:
            if owned:
                ex.close()
            forget_runtime(job_id)
        return _attach(result)


def run_job(
    job_id: str,
    *,
    executor: str | ExecutorAdapter | None = None,
    program_path: Path | None = None,
    on_progress: ProgressFn | None = None,
    store: JobStore | None = None,
) -> dict[str, Any]:
    """Run or resume a stored job to the end; returns its summary (a finished job is not run again)."""
    from dmipro import observability

    observability.setup()
    store = store or JobStore()
    record = store.get(job_id)
    if record.state.finished and record.result is not None:
        return dict(record.result)
    if record.state is JobState.CANCELLED:
        raise OptimizationError(f"job {job_id} was cancelled before it ran")
    runtime = get_runtime(job_id)
    owned = not isinstance(executor, ExecutorAdapter)
    ex = (
        executor
        if isinstance(executor, ExecutorAdapter)
        else make_executor(executor or runtime.spec.executor.backend, runtime.spec.executor.concurrency,
                           priority=runtime.spec.executor.priority)
    )
    try:
        with observability.background_task("optimize"):
            result = Coordinator(
                job_id, runtime, ex, store=store, on_progress=on_progress, program_path=program_path
            ).run()
    finally:
        if owned:
            ex.close()
    return result.summary()
