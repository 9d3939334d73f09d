"""Commands for workers and submitted jobs, as plain functions with typer annotations.

The ``dmipro`` app mounts them: ``dmipro worker celery|rq``, ``dmipro submit``,
``dmipro status``, ``dmipro wait``, ``dmipro cancel`` and ``dmipro flower``. Each turns a
:class:`~dmipro.errors.DmiproError` into ``error: ...`` on stderr and exit status 2.

Each command imports what it runs (Celery, RQ, the job stack) inside its body: every
``dmipro`` invocation builds this app, and ``dmipro --help`` must not pay for them.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from dmipro._cli_util import cli_errors, write_json
from dmipro.defaults import COORDINATOR_QUEUE, WORK_QUEUE
from dmipro.errors import ConfigError
from dmipro.refs import ensure_importable, trusted_code_paths

__all__ = [
    "cancel_cmd",
    "flower_cmd",
    "status_cmd",
    "submit_cmd",
    "wait_cmd",
    "worker_celery",
    "worker_rq",
]

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object for scripts.")]
JobIdArg = Annotated[str, typer.Argument(help="The job id submit printed.", show_default=False)]


def _emit(data: Any) -> None:
    write_json(data)


def _show(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _emit(report)
    else:
        typer.echo(_describe(report))


def _describe(report: dict[str, Any]) -> str:
    state = report["state"] + (f": {report['waiting']}" if report.get("waiting") else "")
    parts = [f"{report['job_id']}: {state}"]
    if report.get("state") == "stale":
        parts.append(f"no coordinator heartbeat for {report.get('heartbeat_age_s')}s")
    if report.get("phase"):
        parts.append(f"phase {report['phase']}")
    if report.get("trials_total"):
        parts.append(f"trials {report.get('trials_done') or 0}/{report['trials_total']}")
    if report.get("best_score") is not None:
        parts.append(f"best {report['best_score']:.2f}")
    if report.get("lm_calls") is not None:
        parts.append(f"{report['lm_calls']} LM calls, {report.get('tokens') or 0} tokens")
    if report.get("retries") or report.get("lm_errors"):
        parts.append(f"{report.get('retries') or 0} LM retries, {report.get('lm_errors') or 0} LM errors, "
                     f"{report.get('rate_limited_wait_s') or 0:.1f}s waited on rate limits")
    line = ", ".join(parts)
    for state in (report.get("lm_health") or {}).values():
        line += f"\nprovider: {state}"
    if report.get("error"):
        line += f"\nerror: {report['error']}"
    return line


@cli_errors
def worker_celery(
    queues: Annotated[str, typer.Option(help="Comma-separated queues to consume.")] =
        f"{COORDINATOR_QUEUE},{WORK_QUEUE}",
    concurrency: Annotated[int, typer.Option(help="Task slots (threads or processes).")] = 8,
    pool: Annotated[str, typer.Option(help="threads | prefork | solo (threads suit I/O-bound LM calls).")] =
        "threads",
    loglevel: Annotated[str, typer.Option(help="debug | info | warning | error")] = "info",
    hostname: Annotated[str | None, typer.Option(help="Worker name (default: dmipro-<pid>@<host>).")] = None,
) -> None:
    """Run a Celery worker on the dmipro queues (broker: DMIPRO_BROKER_URL).

    A worker on dmipro.coordinator also runs the reconciler: when it starts
    and every DMIPRO_RECONCILE_INTERVAL seconds (default 60, 0: off) it
    sends a queued or running job's coordinator again when its message is
    gone (not in the queue, not held by a live worker, no lease) and the
    job row has not changed for DMIPRO_RECONCILE_GRACE seconds (default 60).
    """
    from dmipro.workers.celery_app import get_app

    # Per-process setup (observability included) runs in the processes that execute tasks:
    # worker_process_init for prefork children, worker_init for the thread pool.
    ensure_importable(trusted_code_paths())
    argv = ["worker", f"--queues={queues}", f"--concurrency={concurrency}", f"--pool={pool}",
            f"--loglevel={loglevel}", "--task-events"]
    # Unique by default: two workers named alike on one host merge their replies to a broadcast,
    # so `dmipro status` could not tell whether any of them consumes dmipro.coordinator.
    argv.append(f"--hostname={hostname or f'dmipro-{os.getpid()}@%h'}")
    get_app().worker_main(argv)


@cli_errors
def worker_rq(
    queues: Annotated[str, typer.Option(help="Comma-separated queues, highest priority first. Coordinators "
                                             "hold their worker for a whole job: give dmipro.coordinator its "
                                             "own workers.")] = WORK_QUEUE,
    burst: Annotated[bool, typer.Option(help="Exit once the queues are empty.")] = False,
    workers: Annotated[int, typer.Option(help="Worker processes (each runs one task at a time).")] = 1,
    loglevel: Annotated[str, typer.Option(help="debug | info | warning | error")] = "info",
) -> None:
    """Run RQ workers on the dmipro queues (Redis: DMIPRO_BROKER_URL).

    A job needs two processes. A coordinator worker holds its process for a whole job:

        dmipro worker rq --queues dmipro.coordinator

    and one or more work workers run the LM tasks:

        dmipro worker rq --queues dmipro.work --workers 8

    Without --queues only dmipro.work is consumed: a submitted job then stays queued,
    and `dmipro status` says "queued: no worker consumes dmipro.coordinator".

    Workers keep a short-lived key in Redis, so the tasks of a worker that
    dies are sent again within seconds. A worker on dmipro.coordinator also
    runs the reconciler: when it starts and every DMIPRO_RECONCILE_INTERVAL
    seconds (default 60, 0: off) it sends a queued or running job's
    coordinator again when its message is gone (not in the queue, not held
    by a live worker, no lease) and the job row has not changed for
    DMIPRO_RECONCILE_GRACE seconds (default 60).
    """
    from dmipro.workers.rq_worker import run_worker

    run_worker(queues.split(","), burst=burst, workers=workers, loglevel=loglevel)


@cli_errors
def submit_cmd(
    job: Annotated[Path, typer.Argument(help="Job file (YAML).", show_default=False)],
    executor: Annotated[str, typer.Option("--executor", "-e", help="celery | rq")] = "celery",
    as_json: JsonFlag = False,
) -> None:
    """Validate a job and queue it for the workers; prints its id."""
    from dmipro.jobs.submit import submit

    handle = submit(job, executor=executor)
    if as_json:
        _emit({"job_id": handle.job_id})
    else:
        typer.echo(f"submitted {handle.job_id} to {executor}; follow it with: dmipro status {handle.job_id}")


@cli_errors
def status_cmd(job_id: JobIdArg, as_json: JsonFlag = False) -> None:
    """Show a job's state, phase, trials, best score and LM usage."""
    from dmipro.jobs.submit import status

    report = status(job_id)
    _show(report, as_json)


@cli_errors
def wait_cmd(
    job_id: JobIdArg,
    timeout: Annotated[float | None, typer.Option(help="Give up after this many seconds (exit 2).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Wait for a job to finish; exit 0 if it succeeded, 1 if it failed or was cancelled.

    On a terminal a live line on stderr follows the job (phase, trials, best score, LM
    use); stdout gets the final report only, and under --json nothing else is printed.
    """
    from dmipro.jobs.submit import wait

    live = not as_json and sys.stderr.isatty()

    def waiting(reason: str) -> None:  # on stderr: stdout stays the final report
        typer.echo(("\r\033[K" if live else "") + f"{job_id}: queued: {reason}", err=True)

    def progress(report: dict[str, Any]) -> None:
        line = _describe({**report, "error": None}).splitlines()[0]
        sys.stderr.write("\r\033[K" + line[: shutil.get_terminal_size().columns - 1])
        sys.stderr.flush()

    try:
        report = wait(job_id, timeout, on_waiting=waiting, on_progress=progress if live else None)
    finally:
        if live:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
    _show(report, as_json)
    if report["state"] != "succeeded":
        raise typer.Exit(1)


@cli_errors
def cancel_cmd(job_id: JobIdArg, as_json: JsonFlag = False) -> None:
    """Cancel a job: a queued one at once, a running one after its current batch of trials."""
    from dmipro.jobs.submit import cancel

    report = cancel(job_id)
    _show(report, as_json)


@cli_errors
def flower_cmd(
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 5555,
    address: Annotated[str, typer.Option(help="Address to bind (loopback unless FLOWER_BASIC_AUTH is set).")]
        =
        "127.0.0.1",
    basic_auth: Annotated[str | None, typer.Option(
        help="Refused: a password on the command line shows in ps; set FLOWER_BASIC_AUTH instead.",
        hidden=True)] = None,
) -> None:
    """Start Flower on the project's broker: workers, tasks, coordinator progress.

    Without auth, Flower serves its whole UI (every task's arguments and results) to
    whoever reaches it, so a bind to anything but loopback needs ``FLOWER_BASIC_AUTH``
    (``user:password``) or ``FLOWER_AUTH`` (OAuth) in the environment. Its HTTP API
    (``/api/workers``, ``/api/tasks``) answers 401 unless auth is configured or
    ``FLOWER_UNAUTHENTICATED_API=true`` is set — use the latter only on loopback.
    """
    import ipaddress
    import os

    from dmipro.workers.celery_app import FLOWER_TASK_COLUMNS, get_app

    if basic_auth is not None:
        raise ConfigError("--basic-auth puts the password on the command line (visible in ps); "
                          "export FLOWER_BASIC_AUTH=user:password instead")
    try:
        loopback = address == "localhost" or ipaddress.ip_address(address).is_loopback
    except ValueError:
        loopback = False
    authed = bool(os.environ.get("FLOWER_BASIC_AUTH") or os.environ.get("FLOWER_AUTH"))
    if not loopback and not authed:
        raise ConfigError(f"refusing to serve Flower on {address} without auth: it would show every task's "
                          "arguments and results to anyone who reaches it; export "
                          "FLOWER_BASIC_AUTH=user:password or bind 127.0.0.1")
    argv = ["flower", f"--port={port}", f"--address={address}", f"--tasks_columns={FLOWER_TASK_COLUMNS}"]
    app = get_app()
    app.set_current()  # Flower's task-result API reads the current app's result backend
    app.start(argv)
