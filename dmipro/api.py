"""The Python entry points: validate, evaluate, optimize, submit."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dmipro.errors import JobSpecError
from dmipro.evaluation import EvaluationResult, Evaluator
from dmipro.executor_adapters import ExecutorAdapter, make_executor
from dmipro.jobs import JobStore, forget_runtime, new_job_id, register_runtime
from dmipro.jobs._load import JobSource, resolve_job
from dmipro.jobs.candidate import Candidate
from dmipro.jobs.runtime import check_plan, plan_for
from dmipro.jobs.store import check_job_id, stored_form
from dmipro.teleprompt.coordinator import Coordinator, ProgressFn
from dmipro.teleprompt.result import OptimizationResult

__all__ = ["JobSource", "check_plan", "evaluate", "optimize", "resolve_job"]

def evaluate(
    source: JobSource,
    *,
    executor: str | ExecutorAdapter | None = None,
    split: str = "val",
    concurrency: int | None = None,
    candidate: Candidate | None = None,
) -> EvaluationResult:
    """Evaluate the job's program on its valset (or another split).

    ``candidate`` (instructions and demos per predictor, e.g. an optimization's
    ``best_candidate``) is applied first; without it the program is scored as written.

    Without a valset, the last 80% of the trainset is the valset (DSPy's rule).
    Remote executors get a job row so their workers can load the job; in-process
    executors write nothing.
    """
    job = resolve_job(source)
    spec = job.spec
    owned = not isinstance(executor, ExecutorAdapter)
    ex = (
        executor
        if isinstance(executor, ExecutorAdapter)
        else make_executor(executor or spec.executor.backend, concurrency or spec.executor.concurrency)
    )
    job_id = f"{spec.name}-eval-{uuid.uuid4().hex[:8]}"
    try:
        if ex.remote:
            job_id = JobStore().create(name=spec.name, spec=job.to_json(), executor=ex.name).id
        runtime = register_runtime(job_id, spec)
        evaluator = Evaluator(
            job_id, ex, split=split, size=len(runtime.split(split)), chunk_size=spec.executor.chunk_size
        )
        start = time.perf_counter()
        result = evaluator(candidate)
        result.wall_s = time.perf_counter() - start
        return result
    finally:
        forget_runtime(job_id)
        if owned:
            ex.close()


@contextmanager
def _executor(
    executor: str | ExecutorAdapter | None, spec: Any, concurrency: int | None
) -> Iterator[ExecutorAdapter]:
    """The given executor, or one built from the job's settings and closed afterwards."""
    if isinstance(executor, ExecutorAdapter):
        yield executor
        return
    built = make_executor(executor or spec.executor.backend, concurrency or spec.executor.concurrency)
    try:
        yield built
    finally:
        built.close()


def optimize(
    source: JobSource,
    *,
    executor: str | ExecutorAdapter | None = None,
    job_id: str | None = None,
    out: str | Path | None = None,
    concurrency: int | None = None,
    on_progress: ProgressFn | None = None,
) -> OptimizationResult:
    """Run MIPROv2 on a job in this process (its tasks on ``executor``); returns the result.

    ``job_id`` of an earlier run of the same job resumes it: finished phases are not
    recomputed and the study continues. The best program is written as DSPy JSON to
    ``out`` (default ``$DMIPRO_HOME/programs/<job_id>.json``) and registered if the job
    has a ``register:`` block.
    """
    if job_id is not None:
        check_job_id(job_id)
    job = resolve_job(source)
    spec = job.spec
    run_id = job_id or new_job_id(spec.name)
    runtime = register_runtime(run_id, spec)
    try:
        plan_for(runtime)  # a job MIPROv2 cannot run fails here, before anything is written
        store = JobStore()
        record = store.find(run_id)
        if record is None:
            store.create(name=spec.name, spec=job.to_json(), executor=spec.executor.backend, job_id=run_id)
        elif record.spec != stored_form(job.to_json())[0]:
            raise JobSpecError(
                f"job {run_id} was started from a different spec; resume it with the same job "
                "file and data, or start a new job without --job-id"
            )
        with _executor(executor, spec, concurrency) as ex:
            return Coordinator(
                run_id,
                runtime,
                ex,
                store=store,
                on_progress=on_progress,
                program_path=Path(out) if out else None,
            ).run()
    finally:
        forget_runtime(run_id)
