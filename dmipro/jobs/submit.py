"""Submit a job to Celery or RQ workers, and follow it: status, wait, result, cancel.

``submit`` validates the job completely, writes its row (``queued``) and enqueues the
``optimize`` coordinator on the ``dmipro.coordinator`` queue; workers do the rest. The
job row is the source of truth for everything a :class:`JobHandle` reports, so a handle
works from any process that can reach the job database — ``JobHandle(job_id)`` rebuilds
one from an id.

    handle = submit("examples/math_qa/job.yaml", executor="celery")
    handle.wait(timeout=600)
    program = handle.result()          # a dspy.Module with the optimized prompts
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dmipro.config import get_settings, mask_passwords
from dmipro.db import is_sqlite
from dmipro.defaults import COORDINATOR_QUEUE
from dmipro.errors import (
    ConfigError,
    DmiproError,
    ExecutorError,
    JobSpecError,
    JobTimeoutError,
    OptimizationError,
    StorageError,
)
from dmipro.executor_adapters import REMOTE_BACKENDS, RemoteAdapter, remote_adapter
from dmipro.jobs._load import Job, JobSource, instantiate, resolve_job
from dmipro.jobs._policy import check_lm_policy
from dmipro.jobs.runtime import check_plan
from dmipro.jobs.spec import JobSpec
from dmipro.jobs.store import JobRecord, JobState, JobStore, check_job_id
from dmipro.refs import ensure_importable, trusted_code_paths
from dmipro.storage.database import DatabaseProgramStore
from dmipro.storage.program import build_program

__all__ = [
    "REMOTE_EXECUTORS",
    "JobHandle",
    "JobTimeoutError",
    "cancel",
    "check_database_for",
    "coordinator_consumers",
    "status",
    "status_of",
    "submit",
    "wait",
]

REMOTE_EXECUTORS = REMOTE_BACKENDS
"""Executors whose workers pick up submitted jobs."""

_CONSUMER_CHECK_S = 5.0
"""How often ``wait`` asks the broker whether a queued job's coordinator queue has a consumer."""

def check_database_for(job: Job, executor: str, *, url: str | None = None) -> None:
    """Refuse a SQLite job database for workers that may run on other machines.

    Allowed when the job sets ``executor.force_sqlite`` or ``DMIPRO_ALLOW_SQLITE_REMOTE``
    is set: then every worker must run on this machine and see the same file.
    """
    settings = get_settings()
    url = url or settings.effective_database_url
    if not is_sqlite(url) or job.spec.executor.force_sqlite or settings.allow_sqlite_remote:
        return
    raise ConfigError(
        f"the job database is SQLite ({url}), which {executor} workers on other machines cannot reach; "
        "set DMIPRO_DATABASE_URL to a PostgreSQL URL (postgresql+psycopg://user@host/db) for the "
        "submitter and every worker, or, when all workers run on this machine, set executor.force_sqlite: "
        "true in the job or DMIPRO_ALLOW_SQLITE_REMOTE=1"
    )


def submit(spec: JobSource, *, executor: str = "celery", job_id: str | None = None) -> JobHandle:
    """Validate ``spec``, write its job row and enqueue its coordinator on ``executor``'s workers.

    Raises a :class:`~dmipro.errors.DmiproError` naming the fix, before anything is
    written, for an invalid job, a non-remote executor, a SQLite job database (see
    :func:`check_database_for`), an id already taken or an unreachable broker.
    """
    if executor not in REMOTE_EXECUTORS:
        raise ConfigError(f"submit sends jobs to workers: executor must be one of "
                          f"{', '.join(REMOTE_EXECUTORS)}, not {executor!r} (run in-process with "
                          "dmipro optimize instead)")
    if job_id is not None:
        check_job_id(job_id)
    job = resolve_job(spec)
    check_lm_policy(job.spec.lm, "lm", remote=True)  # workers apply the same rules with their settings
    if job.spec.prompt_lm is not None:
        check_lm_policy(job.spec.prompt_lm, "prompt_lm", remote=True)
    check_plan(job)  # sizes and settings MIPROv2 cannot run with fail here, not on a worker
    check_database_for(job, executor)
    store = JobStore()
    if job_id is not None and store.find(job_id) is not None:
        raise JobSpecError(f"a job with id {job_id!r} already exists; pick another id or leave it out")
    adapter = remote_adapter(executor)
    _check_broker(adapter)
    backend = job.spec.executor.model_copy(update={"backend": executor})
    job_spec = job.spec.model_copy(update={"executor": backend})
    record = store.create(name=job_spec.name, spec=job_spec.model_dump(mode="json"), executor=executor,
                          job_id=job_id)
    try:
        adapter.enqueue_coordinator(record.id, executor)
    except Exception as exc:
        message = f"could not enqueue the coordinator on {executor}: {type(exc).__name__}: {exc}"
        store.finish(record.id, JobState.FAILED, error=message)
        raise ExecutorError(message) from exc
    return JobHandle(record.id, store=store)


def _check_broker(adapter: type[RemoteAdapter]) -> None:
    try:
        adapter.check_broker()
    except DmiproError:
        raise
    except Exception as exc:
        url = get_settings().broker_url
        raise ExecutorError(mask_passwords(f"cannot reach the {adapter.name} broker at {url} "
                                           f"({type(exc).__name__}: {exc}); start Redis or set "
                                           "DMIPRO_BROKER_URL")) from None


def coordinator_consumers(executor: str, *, timeout: float = 1.0) -> int:
    """How many live workers consume ``dmipro.coordinator`` on ``executor``'s broker, asked now.

    Celery: the workers that answer an ``active_queues`` broadcast within ``timeout``.
    RQ: the workers registered on the queue whose last heartbeat is within their TTL.
    Raises :class:`~dmipro.errors.ExecutorError` when the broker cannot be asked.
    """
    try:
        return remote_adapter(executor).coordinator_consumers(timeout)
    except DmiproError:
        raise
    except Exception as exc:
        raise ExecutorError(
            f"cannot ask the {executor} broker for workers ({type(exc).__name__}: {exc})"
        ) from exc


def waiting_reason(record: JobRecord) -> str | None:
    """Why a queued job on workers is not starting, when that can be seen; else None."""
    if record.state is not JobState.QUEUED or record.executor not in REMOTE_EXECUTORS:
        return None
    try:
        consumers = coordinator_consumers(record.executor)
    except ExecutorError as exc:
        return str(exc)
    if consumers == 0:
        return f"no worker consumes {COORDINATOR_QUEUE}"
    return None


_STATUS_FROM_PROGRESS = ("trials_done", "trials_total", "best_score", "baseline_score", "lm_calls", "tokens",
                         "cost_usd", "lm_errors", "retries", "rate_limited", "rate_limited_wait_s",
                         "circuit_opens", "lm_health")
_STATUS_FROM_RESULT = ("best_score", "baseline_score", "lm_calls", "tokens", "cost_usd", "stop_reason",
                       "program_path", "program_id", "registered", "wall_s", "lm_errors", "retries",
                       "rate_limited", "rate_limited_wait_s")


def status_of(record: JobRecord) -> dict[str, Any]:
    """The status report of one job row (what ``dmipro status --json`` prints)."""
    progress = record.progress or {}
    result = record.result or {}
    report: dict[str, Any] = {
        "job_id": record.id,
        "name": record.name,
        "state": record.state.value,
        "phase": record.shown_phase,
        "executor": record.executor,
    }
    report.update({key: progress.get(key) for key in _STATUS_FROM_PROGRESS})
    if result:
        report.update({key: result.get(key) for key in _STATUS_FROM_RESULT})
        report["trials_done"] = result.get("trials", report["trials_done"])
    if record.state is JobState.RUNNING and record.executor in REMOTE_EXECUTORS:
        # A coordinator on a worker marks the row alive every few seconds; a silent one died.
        age = max(0.0, time.time() - record.updated_at)
        report["heartbeat_age_s"] = round(age, 1)
        if age > get_settings().stale_after:
            report["state"] = "stale"
    report.update(
        attempts=record.attempts,
        cancel_requested=record.cancel_requested,
        created_at=record.created_at,
        started_at=record.started_at,
        finished_at=record.finished_at,
        updated_at=record.updated_at,
        error=record.error,
        waiting=None,  # JobHandle.status() asks the broker; a finished job never waits
    )
    return report


class JobHandle:
    """A submitted job, followed through the job database. Safe to use from any thread."""

    def __init__(self, job_id: str, *, store: JobStore | None = None) -> None:
        self.job_id = job_id
        self._store = store or JobStore()

    def __repr__(self) -> str:
        return f"JobHandle({self.job_id!r})"

    @property
    def record(self) -> JobRecord:
        """The job row as it is now."""
        return self._store.get(self.job_id)

    def status(self) -> dict[str, Any]:
        """State, phase, trials done/total, best score, LM calls, tokens, timestamps and error.

        ``waiting`` says why a queued job does not start, when that can be seen (``no worker
        consumes dmipro.coordinator``: the broker was asked for a live consumer); else None.
        """
        record = self.record
        return {**status_of(record), "waiting": waiting_reason(record)}

    def wait(
        self,
        timeout: float | None = None,
        *,
        poll_interval: float = 0.5,
        on_waiting: Callable[[str], None] | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Block until the job is finished (succeeded, failed or cancelled); return its status.

        While the job stays queued the broker is asked, every few seconds, whether a worker
        consumes the coordinator queue; ``on_waiting`` receives each new reason it does not
        start. ``on_progress`` receives the status each time the job's progress changes.
        Raises :class:`JobTimeoutError` when ``timeout`` seconds pass first; its message
        carries that reason.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = min(0.05, poll_interval)
        reason: str | None = None
        next_check = time.monotonic()
        last: tuple[Any, ...] | None = None
        while True:
            record = self.record
            if record.state.finished:
                return status_of(record)
            seen = (record.state, record.phase, record.updated_at)
            if on_progress is not None and seen != last:
                last = seen
                on_progress(status_of(record))
            if record.state is JobState.QUEUED and time.monotonic() >= next_check:
                found = waiting_reason(record)
                if found and found != reason and on_waiting is not None:
                    on_waiting(found)
                reason, next_check = found, time.monotonic() + _CONSUMER_CHECK_S
            elif record.state is not JobState.QUEUED:
                reason = None
            if deadline is not None and time.monotonic() >= deadline:
                why = f": {reason}" if reason else ""
                raise JobTimeoutError(f"job {self.job_id} is still {record.state.value}{why} "
                                      f"(phase {record.phase or '-'}) after {timeout:g}s")
            sleep = delay if deadline is None else max(0.0, min(delay, deadline - time.monotonic()))
            time.sleep(sleep)
            delay = min(delay * 2, poll_interval)

    def result(self) -> Any:
        """The optimized program, read from the job database: a fresh program from the job's ref
        with the stored DSPy state loaded, so any machine that reaches the database gets it.

        Jobs finished before programs were kept in the database fall back to the coordinator's
        file (``program_path``), which must then be on this machine.
        """
        record = self.record
        if record.state is not JobState.SUCCEEDED:
            detail = f": {record.error}" if record.error else ""
            raise OptimizationError(f"job {self.job_id} is {record.state.value}{detail}; a result exists "
                                    "only for a succeeded job")
        ensure_importable(trusted_code_paths())
        program_id = (record.result or {}).get("program_id")
        if program_id:
            url = self._store.url
            return build_program(DatabaseProgramStore(url).load(program_id))
        path = (record.result or {}).get("program_path")
        if not path:
            raise StorageError(f"job {self.job_id} succeeded but recorded no program")
        if not Path(path).is_file():
            raise StorageError(f"the program of job {self.job_id} was saved at {path}, which is not on this "
                               "machine, and the job database holds no copy (it finished before programs "
                               "were kept there); load it from the registry")
        spec = JobSpec.model_validate(record.spec)
        program = instantiate(spec.program)
        try:
            program.load(path)
        except Exception as exc:
            raise StorageError(f"cannot load {path} onto {spec.program}: "
                               f"{type(exc).__name__}: {exc}") from exc
        return program

    def cancel(self) -> dict[str, Any]:
        """Ask the job to stop: a queued job is cancelled at once (its coordinator is revoked),
        a running one stops at the next batch of trials. Returns the status."""
        before = self.record
        after = self._store.request_cancel(self.job_id)
        if status_of(before)["state"] == "stale":  # no coordinator left to see the flag
            age = status_of(before).get("heartbeat_age_s")
            self._store.finish(self.job_id, JobState.CANCELLED,
                               error=f"cancelled; its coordinator had stopped (no heartbeat for {age}s)")
            after = self.record
        if before.state is JobState.QUEUED:
            try:
                remote_adapter(before.executor).cancel_coordinator(self.job_id)
            except Exception:  # the coordinator checks the job row before it runs anyway
                pass
        return status_of(after)


def status(job_id: str) -> dict[str, Any]:
    """The status of job ``job_id`` (see :meth:`JobHandle.status`)."""
    return JobHandle(job_id).status()


def wait(
    job_id: str,
    timeout: float | None = None,
    *,
    on_waiting: Callable[[str], None] | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Wait for job ``job_id`` to finish (see :meth:`JobHandle.wait`)."""
    return JobHandle(job_id).wait(timeout, on_waiting=on_waiting, on_progress=on_progress)


def cancel(job_id: str) -> dict[str, Any]:
    """Cancel job ``job_id`` (see :meth:`JobHandle.cancel`)."""
    return JobHandle(job_id).cancel()
