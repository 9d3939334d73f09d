"""RQ: the job functions workers run, and the worker itself.

Start a worker with ``dmipro worker rq`` or ``python -m dmipro.workers.rq_worker``.
The wire protocol (function paths, timeouts, the coordinator job) is the RQ adapter's,
:mod:`dmipro.executor_adapters.rq`: jobs name :func:`run_task` (work tasks, queue
``dmipro.work``) or :func:`run_optimize` (coordinators, queue ``dmipro.coordinator``).
The W3C trace context of the sender travels in the job's meta (``meta["trace"]``); a
task body's error is recorded in ``meta["error"]`` (type and message) before RQ marks
the job failed, so the executor can raise the same error.

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
from collections.abc import Sequence
from typing import Any

from dmipro import tracing
from dmipro._imports import guarded
from dmipro.defaults import WORK_QUEUE
from dmipro.errors import ConfigError
from dmipro.executor_adapters._remote import error_record
from dmipro.executor_adapters.rq import OPTIMIZE_FUNC, TASK_FUNC, redis_connection
from dmipro.executor_adapters.task_table import execute
from dmipro.refs import ensure_importable, trusted_code_paths
from dmipro.workers._rq_liveness import Worker as LiveWorker
from dmipro.workers.optimize import run_coordinator
from dmipro.workers.setup import setup_worker_process

with guarded(extra="rq", purpose="the RQ worker"):
    from redis import Redis
    from rq import Queue, get_current_job
    from rq.serializers import JSONSerializer
    from rq.worker import WorkerStatus
    from rq.worker_pool import WorkerPool

import dmipro.tasks  # noqa: E402,F401  (registers dmipro's task bodies in the task table)

__all__ = [
    "DmiproWorker",
    "main",
    "make_worker",
    "refusal_reason",
    "run_optimize",
    "run_task",
    "run_worker",
]

log = logging.getLogger(__name__)


def _record_error(exc: BaseException) -> None:
    job: Any = get_current_job()
    if job is None:
        return
    try:
        job.meta["error"] = error_record(exc)
        job.save_meta()
    except Exception as meta_exc:  # RQ still records the traceback
        log.warning("recording the error of job %s failed: %s", job.id, meta_exc)


def _trace() -> dict[str, str] | None:
    job = get_current_job()
    carrier = (job.meta or {}).get("trace") if job is not None else None
    return carrier if isinstance(carrier, dict) else None


def run_task(name: str, body: str) -> dict[str, Any]:
    """Job function of every work task: run registry task ``name`` on the JSON ``body``."""
    setup_worker_process()
    with tracing.attach(_trace()):
        try:
            return execute(name, body)
        except Exception as exc:
            _record_error(exc)
            raise


def run_optimize(body: str) -> dict[str, Any]:
    """Job function of the coordinator; progress goes to the job's ``meta["progress"]``."""
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
    queues = [q for q in queues if q]
    if not queues:
        raise ConfigError("give at least one queue to listen on (dmipro.work, dmipro.coordinator)")
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    if workers == 1:
        setup_worker_process(loglevel=loglevel)
        make_worker(queues, name=name).work(burst=burst, logging_level=loglevel.upper())
        return

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
