"""RQ: the job functions workers run, and the worker itself.

Start a worker with ``dmipro worker rq`` or ``python -m dmipro.workers.rq_worker``.
Jobs are enqueued with RQ's JSON serializer and name their function by dotted path:
``dmipro.workers.rq_worker.run_task(name, body)`` for work tasks (queue ``dmipro.work``)
and ``dmipro.workers.rq_worker.run_optimize(body)`` for coordinators (queue
``dmipro.coordinator``). The W3C trace context of the sender travels in the job's meta
(``meta["trace"]``); a task body's error is recorded in ``meta["error"]`` (type and
message) before RQ marks the job failed, so the executor can raise the same error.

Workers are :class:`rq.SimpleWorker`\\ s: jobs run in the worker process, without a
fork per job, so the program, datasets and LMs each job loads stay cached between its
tasks. An RQ worker runs one job at a time, and a coordinator holds its worker for the
whole optimization: run coordinators on their own workers
(``--queues dmipro.coordinator``), never on the only worker of ``dmipro.work``.

Anyone who can write to the broker's Redis can put a job in a queue, and RQ would import
and call whatever function such a job names. :class:`DmiproWorker` refuses, before
importing anything, every job that is not exactly one of the two entry points above
(with their argument shapes, and without RQ callbacks or webhooks, which RQ would also
import or call); a refused job is logged and marked failed, and the worker carries on.
Give Redis a password (``redis://:PASSWORD@host``) or TLS (``rediss://``) all the same.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Sequence
from typing import Any

from dmipro.defaults import COORDINATOR_QUEUE, WORK_QUEUE
from dmipro.errors import ConfigError

try:
    from redis import Redis
    from rq import Queue, get_current_job
    from rq.serializers import JSONSerializer
except ImportError as _exc:  # pragma: no cover - depends on the installed extras
    raise ConfigError("the RQ executor needs the rq extra: pip install 'dmipro[rq]'") from _exc

from dmipro.workers._rq_liveness import Worker as LiveWorker

__all__ = [
    "COORDINATOR_TIMEOUT_S",
    "OPTIMIZE_FUNC",
    "RESULT_TTL_S",
    "TASK_FUNC",
    "WORK_TIMEOUT_S",
    "DmiproWorker",
    "cancel_optimize",
    "coordinator_job_id",
    "enqueue_optimize",
    "main",
    "make_worker",
    "redis_connection",
    "refusal_reason",
    "run_optimize",
    "run_task",
    "run_worker",
]

log = logging.getLogger(__name__)

TASK_FUNC = "dmipro.workers.rq_worker.run_task"
"""Dotted path of the work-task job function."""
OPTIMIZE_FUNC = "dmipro.workers.rq_worker.run_optimize"
"""Dotted path of the coordinator job function."""

WORK_TIMEOUT_S = 3600
"""Job timeout of a work task: a chunk of LM calls, with provider retries and back-off."""
COORDINATOR_TIMEOUT_S = 7 * 24 * 3600
"""Job timeout of a coordinator: a whole optimization."""
RESULT_TTL_S = 24 * 3600
"""How long results stay in Redis (the coordinator reads them within moments)."""
FAILURE_TTL_S = 7 * 24 * 3600
"""How long failed jobs stay in RQ's failed registry, for inspection."""


def redis_connection(url: str | None = None) -> Redis:
    """A Redis connection to ``url`` (default: the settings' broker URL)."""
    from dmipro.config import get_settings

    return Redis.from_url(url or get_settings().broker_url)


def _record_error(exc: BaseException) -> None:
    job: Any = get_current_job()
    if job is None:
        return
    try:
        job.meta["error"] = {"type": type(exc).__name__, "message": str(exc)}
        job.save_meta()
    except Exception as meta_exc:  # RQ still records the traceback
        log.warning("recording the error of job %s failed: %s", job.id, meta_exc)


def _trace() -> dict[str, str] | None:
    job = get_current_job()
    carrier = (job.meta or {}).get("trace") if job is not None else None
    return carrier if isinstance(carrier, dict) else None


def run_task(name: str, body: str) -> dict[str, Any]:
    """Job function of every work task: run registry task ``name`` on the JSON ``body``."""
    from dmipro import tracing
    from dmipro.tasks import execute
    from dmipro.workers.setup import setup_worker_process

    setup_worker_process()
    with tracing.attach(_trace()):
        try:
            return execute(name, body)
        except Exception as exc:
            _record_error(exc)
            raise


def run_optimize(body: str) -> dict[str, Any]:
    """Job function of the coordinator; progress goes to the job's ``meta["progress"]``."""
    from dmipro import tracing
    from dmipro.workers._coordinate import run_coordinator
    from dmipro.workers.setup import setup_worker_process

    setup_worker_process()
    job: Any = get_current_job()

    def on_progress(progress: dict[str, Any]) -> None:
        if job is not None:
            job.meta["progress"] = progress
            job.save_meta()

    with tracing.attach(_trace()):
        try:
            return run_coordinator(body, backend="rq", on_progress=on_progress)
        except Exception as exc:
            _record_error(exc)
            raise


def coordinator_job_id(job_id: str) -> str:
    """The RQ job id of a job's coordinator (RQ ids allow letters, digits, ``_`` and ``-``)."""
    return "optimize-" + re.sub(r"[^A-Za-z0-9_-]", "_", job_id)


def enqueue_optimize(job_id: str, executor: str = "rq", *, connection: Redis | None = None) -> str:
    """Enqueue a job's coordinator on ``dmipro.coordinator``; returns the RQ job id."""
    import json

    from dmipro import tracing

    queue = Queue(COORDINATOR_QUEUE, connection=connection or redis_connection(), serializer=JSONSerializer)
    rq_id = coordinator_job_id(job_id)
    queue.enqueue_call(
        OPTIMIZE_FUNC, args=(json.dumps({"job_id": job_id, "executor": executor}),),
        timeout=COORDINATOR_TIMEOUT_S, result_ttl=FAILURE_TTL_S, failure_ttl=FAILURE_TTL_S, job_id=rq_id,
        meta={"trace": tracing.inject(), "job_id": job_id}, description=f"dmipro.optimize(job_id={job_id})",
    )
    return rq_id


def cancel_optimize(job_id: str, *, connection: Redis | None = None) -> None:
    """Keep a job's coordinator from starting if it is still queued (best effort)."""
    from rq.exceptions import InvalidJobOperation, NoSuchJobError
    from rq.job import Job, JobStatus

    try:
        job = Job.fetch(coordinator_job_id(job_id), connection=connection or redis_connection(),
                        serializer=JSONSerializer)
        if job.get_status() in (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED):
            job.cancel()
    except (NoSuchJobError, InvalidJobOperation):
        pass


_ENTRY_POINTS = {TASK_FUNC: 2, OPTIMIZE_FUNC: 1}
"""The only functions a dmipro RQ worker runs, with the number of (string) arguments each takes."""


def refusal_reason(job: Any) -> str | None:
    """Why ``job`` must not run on a dmipro worker, or None when it is one of dmipro's own.

    Reads only the job's JSON data and hash fields: nothing the job names is imported.
    """
    try:
        func_name = job.func_name
        instance, args, kwargs = job.instance, job.args, job.kwargs
    except Exception as exc:  # not JSON, or not RQ's (func, instance, args, kwargs) tuple
        return f"its data does not decode ({type(exc).__name__})"
    if func_name not in _ENTRY_POINTS:
        return f"it names the function {str(func_name)[:200]!r}, which is not a dmipro entry point"
    if instance is not None:
        return "it names an instance to call the function on"
    if kwargs or not isinstance(args, list | tuple) or len(args) != _ENTRY_POINTS[func_name] \
            or not all(isinstance(a, str) for a in args):
        return f"its arguments are not what {func_name} takes"
    for attr in ("_success_callback_name", "_failure_callback_name", "_stopped_callback_name"):
        if getattr(job, attr, None):
            return f"it names a callback ({attr.strip('_').removesuffix('_name')})"
    if getattr(job, "webhooks", None):
        return "it carries webhooks"
    return None


class DmiproWorker(LiveWorker):
    """dmipro's RQ worker (:class:`~dmipro.workers._rq_liveness.Worker`, a ``SimpleWorker``
    that keeps a short-lived key and reconciles) that runs only dmipro's two entry points.

    Any other job (a foreign function, callbacks, webhooks, undecodable data) is refused
    before anything it names is imported: logged at ERROR, marked failed with the reason,
    never retried. The worker keeps serving its queues.
    """

    def execute_job(self, job: Any, queue: Any) -> None:
        reason = refusal_reason(job)
        if reason is None:
            super().execute_job(job, queue)
            return
        log.error("refused RQ job %s from queue %s: %s", job.id, queue.name, reason)
        try:
            # Strip what RQ would act on after a failure: retries, callbacks and webhooks.
            job.retries_left = None
            job.webhooks = []
            job._success_callback_name = job._failure_callback_name = job._stopped_callback_name = None
            execution = self.prepare_execution(job)
            self.handle_job_failure(job, queue, exc_string=f"RefusedJob: {reason}", execution=execution)
        except Exception:  # recording the refusal failed; the job stays unrun either way
            log.exception("recording the refusal of RQ job %s failed", job.id)
        from rq.worker import WorkerStatus

        self.set_state(WorkerStatus.IDLE)


def make_worker(queues: Sequence[str], *, connection: Redis | None = None,
                name: str | None = None) -> DmiproWorker:
    """A worker for ``queues`` (in priority order) using the JSON serializer."""

    connection = connection or redis_connection()
    qs = [Queue(q, connection=connection, serializer=JSONSerializer) for q in queues]
    return DmiproWorker(qs, connection=connection, serializer=JSONSerializer, name=name)


def run_worker(queues: Sequence[str], *, burst: bool = False, workers: int = 1, loglevel: str = "INFO",
               name: str | None = None) -> None:
    """Run ``workers`` worker processes on ``queues`` until stopped (or, with ``burst``, until idle)."""
    from dmipro.workers.setup import setup_worker_process

    queues = [q for q in queues if q]
    if not queues:
        raise ConfigError("give at least one queue to listen on (dmipro.work, dmipro.coordinator)")
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    if workers == 1:
        setup_worker_process(loglevel=loglevel)
        make_worker(queues, name=name).work(burst=burst, logging_level=loglevel.upper())
        return

    from rq.worker_pool import WorkerPool

    from dmipro.refs import ensure_importable, trusted_code_paths

    # Each pool process sets itself up when it runs its first task (after the fork, so that
    # telemetry threads start in the process that uses them).
    ensure_importable(trusted_code_paths())

    pool = WorkerPool(queues, connection=redis_connection(), num_workers=workers, worker_class=DmiproWorker,
                      serializer=JSONSerializer)
    pool.start(burst=burst, logging_level=loglevel.upper())


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m dmipro.workers.rq_worker [--queues Q1,Q2] [--burst] [--workers N]``."""
    parser = argparse.ArgumentParser(prog="python -m dmipro.workers.rq_worker", description=main.__doc__)
    parser.add_argument("--queues", default=WORK_QUEUE, help="comma-separated queues, highest priority first")
    parser.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--loglevel", default="INFO")
    parser.add_argument("--name", default=None, help="worker name (default: RQ's)")
    args = parser.parse_args(argv)
    run_worker(args.queues.split(","), burst=args.burst, workers=args.workers, loglevel=args.loglevel,
               name=args.name)


if __name__ == "__main__":
    main()
