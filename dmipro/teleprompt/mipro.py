"""``dmipro.MIPROv2``: DSPy's MIPROv2, run as a job over any executor.

It is a ``dspy.teleprompt.Teleprompter`` taking the same arguments as ``dspy.MIPROv2``
(plus ``executor``, ``parallel_trials`` and a budget), so switching is a one-line change::

    optimizer = dmipro.MIPROv2(metric=exact_match, auto="light", executor="thread")
    optimized = optimizer.compile(program, trainset=trainset, valset=valset)

In-process executors (``thread``, ``inline``) run the caller's objects as they are: the
program, metric, teacher, ``dspy.Example`` objects and the DSPy settings in force at
``compile`` (``dspy.configure`` / ``dspy.context``), applied in every worker thread.
``celery`` and ``rq`` run on other machines: the program, metric and teacher must be
importable references and the examples JSON; ``compile`` then submits a job and waits.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from dmipro import defaults, observability
from dmipro.config import get_settings
from dmipro.db import dispose_engine
from dmipro.errors import OptimizationError, OptimizerArgumentError
from dmipro.executor_adapters import ExecutorAdapter, make_executor
from dmipro.jobs.candidate import apply_candidate
from dmipro.jobs.runtime import capture_dspy_settings, forget_runtime, get_runtime, plan_for, register_runtime
from dmipro.jobs.spec import ExecutorConfig, JobSpec, LMConfig, OptimizerConfig
from dmipro.jobs.store import JobState, JobStore
from dmipro.refs import ref_of
from dmipro.teleprompt._remote_compile import compile_remote
from dmipro.teleprompt.coordinator import Coordinator, ProgressFn
from dmipro.teleprompt.result import OptimizationResult, json_trial_logs
from dmipro.teleprompt.teleprompt import Teleprompter

__all__ = ["MIPROv2", "dspy_trial_logs", "run_job"]

log = logging.getLogger(__name__)

_REMOTE = ("celery", "rq")


def _program_file(program: Any, log_dir: str | None, name: str) -> str | None:
    """Save a candidate as DSPy's ``save_candidate_program`` does; None without a ``log_dir``."""
    if log_dir is None:
        return None
    folder = Path(log_dir) / "evaluated_programs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"program_{name}.json"
    program.save(str(path))
    return str(path)


def dspy_trial_logs(
    result: OptimizationResult, *, log_dir: str | None, val_size: int, minibatch_size: int
) -> dict[int, dict[str, Any]]:
    """``trial_logs`` with ``dspy.MIPROv2``'s keys, plus dmipro's (``kind``, ``score``, ``params``...).

    On top of :func:`json_trial_logs`: ``full_eval_program`` and ``full_eval_program_path``
    for a full evaluation, ``mb_program`` and ``mb_program_path`` for a minibatch trial. With
    a ``log_dir`` each candidate is written to ``log_dir/evaluated_programs`` under DSPy's
    file names.
    """
    minibatch = any(e.get("kind") == "minibatch" for e in result.trial_logs.values())
    logs = json_trial_logs(result.trial_logs, val_size=val_size, minibatch_size=minibatch_size)
    for number, entry in logs.items():
        program = apply_candidate(result.program.deepcopy(), result.trial_candidates.get(number))
        full = bool(entry.get("full_eval"))
        if entry.get("kind") == "baseline":
            file_name = "-1"
        elif full and minibatch:
            file_name = f"{number}_full_eval"
        else:
            file_name = str(number)
        prefix = "full_eval" if full else "mb"
        entry[f"{prefix}_program"] = program
        entry[f"{prefix}_program_path"] = _program_file(program, log_dir, file_name)
    return logs


def _key(entry: dict[str, Any]) -> dict[str, Any]:
    return {"candidate": entry["candidate"]}


def _attach(
    result: OptimizationResult, *, track_stats: bool, log_dir: str | None, val_size: int, minibatch_size: int
) -> Any:
    """The optimized module, carrying what DSPy's MIPROv2 attaches (with ``track_stats``) plus dmipro's."""
    program = result.program
    trial_logs = dspy_trial_logs(result, log_dir=log_dir, val_size=val_size, minibatch_size=minibatch_size)
    if not track_stats:  # DSPy attaches nothing then
        return program
    program.score = result.best_score
    program.trial_logs = trial_logs
    program.candidate_programs = result.candidate_programs
    program.mb_candidate_programs = sorted(
        (
            {"score": e["mb_score"], "program": e["mb_program"], "full_eval": False, **_key(e)}
            for e in trial_logs.values()
            if "mb_score" in e
        ),
        key=lambda e: -e["score"],
    )
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


def _store_configured() -> bool:
    """Whether the user chose where dmipro keeps jobs (env, or ``dmipro.yaml``)."""
    settings = get_settings()
    return bool(
        settings.database_url or "DMIPRO_HOME" in os.environ or settings.home != Path(defaults.DEFAULT_HOME)
    )


@contextmanager
def _job_store() -> Iterator[tuple[JobStore, Path | None]]:
    """The configured job store; otherwise a temporary one, deleted afterwards.

    ``compile`` must leave nothing behind in the working directory, as DSPy's does; a
    configured store (``DMIPRO_HOME``, ``DMIPRO_DATABASE_URL`` or ``dmipro.yaml``) keeps the
    job, so ``job_id=`` can resume it.
    """
    if _store_configured():
        yield JobStore(), None
        return
    folder = Path(tempfile.mkdtemp(prefix="dmipro-compile-"))
    url = f"sqlite:///{folder / 'jobs.db'}"
    try:
        yield JobStore(url), folder
    finally:
        dispose_engine(url)
        shutil.rmtree(folder, ignore_errors=True)


class MIPROv2(Teleprompter):
    """MIPROv2 with DSPy's arguments, defaults and errors; tasks go to ``executor``.

    It is a ``dspy.teleprompt.Teleprompter`` (``get_params()``, DSPy's composite
    optimizers). Arguments ``dspy.MIPROv2`` refuses with ``ValueError`` are refused with
    :class:`~dmipro.errors.OptimizerArgumentError`, a ``ValueError``.
    """

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

        super().__init__()
        allowed = {None, "light", "medium", "heavy"}
        if auto not in allowed:
            raise OptimizerArgumentError(f"auto must be None, light, medium or heavy, not {auto!r}")
        self.metric = metric
        self.task_model = task_model or dspy.settings.lm
        self.prompt_model = prompt_model or dspy.settings.lm
        if self.task_model is None or self.prompt_model is None:
            raise OptimizerArgumentError(
                "no LM: pass task_model/prompt_model or call dspy.configure(lm=...) first"
            )
        self.teacher_settings = teacher_settings or {}
        self.max_bootstrapped_demos = max_bootstrapped_demos
        self.max_labeled_demos = max_labeled_demos
        self.auto = auto
        self.num_candidates = num_candidates
        self.num_fewshot_candidates = num_candidates
        self.num_instruct_candidates = num_candidates
        self.num_threads = num_threads
        self.max_errors = max_errors
        self.seed = seed
        self.init_temperature = init_temperature
        self.verbose = verbose
        self.track_stats = track_stats
        self.log_dir = log_dir
        self.metric_threshold = metric_threshold
        self.prompt_model_total_calls = 0
        self.total_calls = 0
        self.executor = executor
        self.parallel_trials = parallel_trials
        self.max_lm_calls = max_lm_calls
        self.max_cost_usd = max_cost_usd
        self.name = name

    def _check_arguments(
        self, trainset: list[Any], valset: list[Any] | None, num_trials: int | None, permission: bool | None
    ) -> None:
        """What ``dspy.MIPROv2.compile`` refuses before it starts, refused the same way."""
        if permission is False:
            log.warning("'requires_permission_to_run' is deprecated and will be removed in a future version.")
        elif permission is True:
            raise OptimizerArgumentError(
                "User confirmation is removed from MIPROv2. "
                "Please remove the 'requires_permission_to_run' argument."
            )
        if self.auto is None and (self.num_candidates is None or num_trials is None):
            raise OptimizerArgumentError("with auto=None, give both num_candidates and num_trials")
        if self.auto is not None and num_trials is not None:
            raise OptimizerArgumentError(
                f"auto={self.auto!r} sets num_trials itself; pass auto=None to give num_trials={num_trials}"
            )
        if self.auto is not None and self.num_candidates is not None:
            raise OptimizerArgumentError(
                f"auto={self.auto!r} sets num_candidates itself; pass auto=None to give "
                f"num_candidates={self.num_candidates}"
            )
        if not trainset:
            raise OptimizerArgumentError("trainset is empty; MIPROv2 needs training examples")
        if valset is not None and len(valset) == 0:
            raise OptimizerArgumentError("valset is empty; pass None to split it off the trainset")

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
        interrupted compile resumes it when a job store is configured.
        """
        self._check_arguments(trainset, valset, num_trials, requires_permission_to_run)
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
            raise OptimizerArgumentError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None
        executor = self.executor or "thread"
        if isinstance(executor, ExecutorAdapter) and executor.remote or executor in _REMOTE:
            return compile_remote(
                self,
                student,
                trainset=trainset,
                valset=valset,
                teacher=teacher,
                optimizer=optimizer,
                executor=executor,
                provide_traceback=provide_traceback,
                job_id=job_id,
            )
        settings = capture_dspy_settings()
        if provide_traceback is not None:
            settings["provide_traceback"] = provide_traceback
        input_keys = sorted({key for e in [*trainset, *(valset or [])] for key in _input_keys(e)})

        def ref_or_placeholder(obj: Any, what: str) -> str:
            try:
                return ref_of(obj)
            except Exception:
                return f"inprocess:{what}"

        spec = JobSpec(
            name=self.name,
            program=ref_or_placeholder(type(student), "program"),
            metric=ref_or_placeholder(self.metric, "metric"),
            # The caller's examples stay in this process as they are; the job row names them.
            trainset="inprocess:trainset",
            valset=None if valset is None else "inprocess:valset",
            input_keys=input_keys,
            lm=LMConfig(model=str(getattr(self.task_model, "model", "unknown"))),
            prompt_lm=LMConfig(model=str(getattr(self.prompt_model, "model", "unknown"))),
            optimizer=optimizer,
            executor=ExecutorConfig(
                backend="inline" if executor == "inline" else "thread",
                concurrency=getattr(executor, "capacity", None) or self.num_threads or 16,
            ),
        )
        examples = {"train": list(trainset)}
        if valset is not None:
            examples["val"] = list(valset)
        job_id = job_id or f"{self.name}-{uuid.uuid4().hex[:12]}"
        runtime = register_runtime(
            job_id,
            spec,
            program=student,
            metric=self.metric,
            task_lm=self.task_model,
            prompt_lm=self.prompt_model,
            examples=examples,
            teacher=teacher,
            teacher_settings=self.teacher_settings,
            dspy_settings=settings,
        )
        try:
            plan_for(runtime)  # sizes DSPy refuses (minibatch_size > valset, ...) fail before any write
        except OptimizationError as exc:
            forget_runtime(job_id)
            raise OptimizerArgumentError(str(exc)) from None
        progress = _verbose_progress(on_progress) if self.verbose else on_progress
        owned = not isinstance(executor, ExecutorAdapter)
        try:
            with _job_store() as (store, scratch):
                if store.find(job_id) is None:
                    store.create(
                        name=spec.name,
                        spec=spec.model_dump(mode="json"),
                        executor=spec.executor.backend,
                        job_id=job_id,
                    )
                ex = (
                    executor
                    if isinstance(executor, ExecutorAdapter)
                    else make_executor(spec.executor.backend, spec.executor.concurrency)
                )
                try:
                    result = Coordinator(
                        job_id,
                        runtime,
                        ex,
                        store=store,
                        on_progress=progress,
                        program_path=None if scratch is None else scratch / "program.json",
                    ).run()
                finally:
                    if owned:
                        ex.close()
                if scratch is not None:  # the file goes with the temporary store
                    result.program_path = None
        finally:
            forget_runtime(job_id)
        val_size = len(result.val_ids) or len(runtime.split("val"))
        self.prompt_model_total_calls = sum(p.prompt_lm.calls for p in result.phases.values())
        self.total_calls = sum(p.task_lm.calls for p in result.phases.values())
        if self.verbose:
            log.info("best program (score %s):", result.best_score)
            for name, part in result.best_candidate.items():
                log.info("  %s: %s (%d demos)", name, part.get("instruction"), len(part.get("demos", [])))
        return _attach(
            result,
            track_stats=self.track_stats,
            log_dir=self.log_dir,
            val_size=val_size,
            minibatch_size=minibatch_size,
        )


def _input_keys(example: Any) -> list[str]:
    try:
        return list(example.inputs().keys())
    except (AttributeError, ValueError) as exc:
        raise OptimizerArgumentError(
            f"every example needs its input keys: call .with_inputs(...) on it ({exc})"
        ) from None


def _verbose_progress(on_progress: ProgressFn | None) -> ProgressFn:
    """Log each progress report at INFO (``verbose=True``), then hand it to the caller's callback."""

    def report(data: dict[str, Any]) -> None:
        log.info("progress: %s", {k: v for k, v in data.items() if v is not None})
        if on_progress is not None:
            on_progress(data)

    return report


def run_job(
    job_id: str,
    *,
    executor: str | ExecutorAdapter | None = None,
    program_path: Path | None = None,
    on_progress: ProgressFn | None = None,
    store: JobStore | None = None,
) -> dict[str, Any]:
    """Run or resume a stored job to the end; returns its summary (a finished job is not run again)."""
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
