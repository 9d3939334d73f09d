"""The ``dmipro`` command line.

Every command that reports something has ``--json``. A :class:`~dmipro.errors.DmiproError`
ends the command with its message on one line of stderr and exit status 2.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

import dmipro
from dmipro import observability
from dmipro._cli_util import json_stdout, write_json
from dmipro.ab.cli import ab_app
from dmipro.config import mask_passwords
from dmipro.errors import DmiproError
from dmipro.refs import ensure_importable, trusted_code_paths
from dmipro.registry.cli import export_command, import_command, registry_app
from dmipro.workers import cli as workers

__all__ = ["app", "main"]

app = typer.Typer(
    name="dmipro",
    help="MIPROv2 prompt optimization for DSPy programs, run as a distributed job system.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
sim_app = typer.Typer(help="The offline simulated LM.", no_args_is_help=True)
app.add_typer(sim_app, name="sim")


@app.callback()
def _setup() -> None:
    """Turn on the subscribers named in DMIPRO_SUBSCRIBERS / dmipro.yaml (cheap when none are)."""
    observability.setup()


# Mounted after this module's own commands, so `dmipro --help` lists those first.
def _mount() -> None:
    app.add_typer(registry_app, name="registry", help="Named, versioned programs: deploy and roll back.")
    app.command("export")(export_command)
    app.command("import")(import_command)
    app.command("submit")(workers.submit_cmd)
    app.command("status")(workers.status_cmd)
    app.command("wait")(workers.wait_cmd)
    app.command("cancel")(workers.cancel_cmd)
    app.command("flower")(workers.flower_cmd)
    worker_app = typer.Typer(help="Run a Celery or RQ worker for dmipro's queues.", no_args_is_help=True)
    worker_app.command("celery")(workers.worker_celery)
    worker_app.command("rq")(workers.worker_rq)
    app.add_typer(worker_app, name="worker")
    app.add_typer(ab_app, name="ab")


console = Console(stderr=True)

JobPath = Annotated[Path, typer.Argument(help="Job file (YAML).", show_default=False)]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object for scripts.")]
ExecutorOpt = Annotated[
    str | None, typer.Option("--executor", "-e", help="inline | thread (default: the job's executor).")
]


def emit_json(data: Any) -> None:
    """Print ``data`` as one line of JSON on stdout (the only thing there under ``--json``)."""
    write_json(data)


@app.command()
def validate(job: JobPath, as_json: JsonFlag = False) -> None:
    """Validate a job file completely (refs, datasets, fields, LM config); print ok."""
    # Deferred for start-up time: dmipro.jobs loads DSPy; `dmipro --help` and the other commands must not.
    from dmipro.jobs import load_job

    loaded = load_job(job)
    if as_json:
        spec = loaded.spec
        emit_json(
            {
                "ok": True,
                "name": spec.name,
                "trainset": len(spec.trainset),
                "valset": len(spec.valset) if isinstance(spec.valset, list) else 0,
            }
        )
    else:
        print("ok")


@app.command()
def evaluate(
    job: JobPath,
    executor: ExecutorOpt = None,
    concurrency: Annotated[int | None, typer.Option(help="Executor slots (default: the job's).")] = None,
    split: Annotated[str, typer.Option(help="val | train | test")] = "val",
    as_json: JsonFlag = False,
) -> None:
    """Evaluate the job's unoptimized program on its valset."""
    # Deferred for start-up time: dmipro.api loads DSPy; `dmipro --help` and the other commands must not.
    from dmipro.api import evaluate as run

    result = run(job, executor=executor, split=split, concurrency=concurrency)
    summary = {
        "score": result.score,
        "n": result.n,
        "errors": result.errors,
        "lm_calls": result.usage.calls,
        "tokens": result.usage.tokens,
        "cost_usd": result.usage.cost_usd,
        "wall_s": round(result.wall_s, 3),
    }
    if as_json:
        emit_json(summary)
    else:
        console.print(
            f"score [bold]{result.score:.2f}[/] on {result.n} examples "
            f"({result.errors} errors), {result.usage.calls} LM calls, {result.usage.tokens} tokens, "
            f"{result.wall_s:.2f}s"
        )


class _ProgressView:
    """A one-line rich progress display on stderr: phase, trial i/N, best so far."""

    def __init__(self, enabled: bool) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("[bold]{task.fields[phase]:<9}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=console,
            disable=not enabled,
            transient=False,
        )
        self.task = self.progress.add_task("optimize", total=None, phase="starting", detail="")

    def __enter__(self) -> _ProgressView:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(None, None, None)

    def __call__(self, info: dict[str, Any]) -> None:
        detail = []
        if info.get("baseline_score") is not None:
            detail.append(f"baseline {info['baseline_score']:.1f}")
        if info.get("best_score") is not None:
            detail.append(f"best {info['best_score']:.1f}")
        detail.append(f"{info.get('lm_calls', 0)} LM calls")
        self.progress.update(
            self.task,
            phase=info.get("phase", ""),
            detail="  ".join(detail),
            total=info.get("trials_total"),
            completed=info.get("trials_done", 0),
        )


def _print_result(result: Any, as_json: bool, extra: dict[str, Any] | None = None) -> None:
    summary = {**result.summary(), **(extra or {})}
    if as_json:
        emit_json(summary)
        return
    from rich.table import Table

    table = Table(title=f"job {result.job_id}", show_header=True)
    table.add_column("")
    table.add_column("baseline", justify="right")
    table.add_column("optimized", justify="right")
    table.add_row("valset score", f"{result.baseline_score:.2f}", f"[bold green]{result.best_score:.2f}")
    if extra and "test_baseline_score" in extra:
        table.add_row(
            "test score", f"{extra['test_baseline_score']:.2f}", f"[bold green]{extra['test_best_score']:.2f}"
        )
    Console().print(table)
    usage = result.usage
    console.print(
        f"{result.trials} trials, {usage.calls} LM calls, {usage.tokens} tokens, "
        f"{result.wall_s:.1f}s, stopped: {result.stop_reason}"
    )
    console.print(f"program: {result.program_path}")
    if result.registered:
        r = result.registered
        console.print(f"registered: {r['name']}@{r['version']}{' (deployed)' if r['deployed'] else ''}")


@app.command()
def optimize(
    job: JobPath,
    executor: ExecutorOpt = None,
    concurrency: Annotated[int | None, typer.Option(help="Executor slots (default: the job's).")] = None,
    job_id: Annotated[
        str | None, typer.Option("--job-id", help="Resume this job, or name a new one.")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the optimized program here.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Optimize a job's program with MIPROv2 in this process; print the scores."""
    # Deferred for start-up time: dmipro.api loads DSPy; `dmipro --help` and the other commands must not.
    from dmipro.api import optimize as run

    with _ProgressView(enabled=not as_json) as view:
        result = run(
            job, executor=executor, job_id=job_id, out=out, concurrency=concurrency, on_progress=view
        )
    _print_result(result, as_json)


@app.command()
def demo(
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the optimized program here.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Optimize the math_qa example on the simulated LM (threads, SQLite) and compare with the baseline."""
    # Deferred for start-up time: dmipro.api loads DSPy; `dmipro --help` and the other commands must not.
    from dmipro.api import evaluate as run_eval
    from dmipro.api import optimize as run
    from dmipro.jobs import load_job

    path = _example_job()
    job = load_job(path)
    with _ProgressView(enabled=not as_json) as view:
        result = run(job, out=out, on_progress=view)
        view(
            {
                "phase": "test",
                "trials_done": result.trials,
                "trials_total": result.trials,
                "best_score": result.best_score,
                "lm_calls": result.usage.calls,
            }
        )
        baseline_test = run_eval(job, split="test").score
        test = run_eval(job, split="test", candidate=result.best_candidate).score
    _print_result(result, as_json, {"test_baseline_score": baseline_test, "test_best_score": test})


def _example_job() -> Path:
    for root in (Path.cwd(), Path(dmipro.__file__).resolve().parent.parent):
        candidate = root / "examples" / "math_qa" / "job.yaml"
        if candidate.is_file():
            return candidate
    raise DmiproError("examples/math_qa/job.yaml not found; run the demo from the dmipro repository")


@app.command()
def jobs(
    limit: Annotated[int, typer.Option(help="How many of the newest jobs.")] = 20,
    as_json: JsonFlag = False,
) -> None:
    """List the newest jobs in the job database: state, phase, trials, best score."""
    from rich.table import Column, Table

    # Deferred for start-up time: dmipro.jobs loads DSPy; `dmipro --help` and the other commands must not.
    from dmipro.jobs import JobStore

    records = JobStore().list(limit)
    if as_json:
        emit_json([r.to_json() | {"result": None} for r in records])
        return
    # Whole ids, on a terminal or not: a truncated id cannot be pasted into `dmipro status`.
    table = Table(Column("job", no_wrap=True, min_width=max((len(r.id) for r in records), default=3)),
                  "state", "phase", "trials", "best", "created")
    for r in records:
        p = r.progress
        best = p.get("best_score")
        table.add_row(
            r.id,
            r.state.value,
            r.shown_phase or "",
            f"{p.get('trials_done', 0)}/{p.get('trials_total', '?')}",
            "" if best is None else f"{best:.2f}",
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created_at)),
        )
    console = Console()
    if not console.is_terminal:  # piped: no terminal width to fit, so never squeeze a column
        wide = console.options.update(max_width=10_000)
        console = Console(width=max(console.width, console.measure(table, options=wide).maximum))
    console.print(table)


@app.command()
def report(
    job_ids: Annotated[list[str], typer.Argument(help="A job id, or two to compare side by side.")],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="report.png or report.html (default: report-<job>.png)."),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """One figure of a run: scores per trial, best so far, which choices mattered, LM use per phase."""
    # Deferred for start-up time: dmipro.report loads DSPy (through the teleprompt package).
    from dmipro.report import report as build

    # --json alone prints the numbers and draws nothing (no matplotlib needed).
    data = build(job_ids, out=out, figure_file=not as_json)
    if as_json:
        emit_json(data)
    else:
        console.print(f"report: {data['out']}")


@sim_app.command("serve")
def sim_serve(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8900,
    latency_ms: Annotated[float, typer.Option(help="Simulated latency per call.")] = 0.0,
    latency_dist: Annotated[str, typer.Option(help="fixed | lognormal")] = "fixed",
    rate_limit_rate: Annotated[float, typer.Option(help="Fraction of calls answered 429.")] = 0.0,
    server_error_rate: Annotated[float, typer.Option(help="Fraction of calls answered 500.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Simulator seed.")] = 0,
    timeout_rate: Annotated[float, typer.Option(help="Fraction of calls answered 504 (a timeout).")] = 0.0,
    timeout_s: Annotated[
        float, typer.Option(help="Hang this long before a timeout's 504, so the client times out.")
    ] = 0.0,
    malformed_rate: Annotated[float, typer.Option(help="Fraction of unparseable replies.")] = 0.0,
    retry_after_s: Annotated[float, typer.Option(help="Retry-After sent with injected 429s.")] = 1.0,
    rpm: Annotated[int | None, typer.Option(help="Enforced requests per minute (429 past it).")] = None,
    tpm: Annotated[int | None, typer.Option(help="Enforced tokens per minute (429 past it).")] = None,
    reject_key: Annotated[bool, typer.Option(help="Answer every completion 401 invalid_api_key.")] = False,
) -> None:
    """Serve the simulator as an OpenAI-compatible API (/v1/chat/completions, /v1/models)."""
    import ipaddress

    # Deferred for start-up time: dmipro.lm loads DSPy; `dmipro --help` and the other commands must not.
    from dmipro.lm.server import run_server

    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        sys.stderr.write(f"warning: serving the simulator on {host}: anyone who can reach port {port} "
                         "can use "
                         "it (it has no auth); bind 127.0.0.1 unless other machines must reach it\n")
    console.print(f"simulated LM on http://{host}:{port}/v1 (models: sim-math, ...); Ctrl+C stops")
    run_server(
        host,
        port,
        latency_ms=latency_ms,
        latency_dist=latency_dist,
        rate_limit_rate=rate_limit_rate,
        server_error_rate=server_error_rate,
        seed=seed,
        timeout_rate=timeout_rate,
        timeout_s=timeout_s,
        malformed_rate=malformed_rate,
        retry_after_s=retry_after_s,
        rpm=rpm,
        tpm=tpm,
        reject_key=reject_key,
    )


@sim_app.command("describe")
def sim_describe(
    task: Annotated[str, typer.Option(help="Simulated task.")] = "math", as_json: JsonFlag = False
) -> None:
    """Show the simulator's response surface: what helps, what hurts, where the optimum is."""
    # Deferred for start-up time: dmipro.lm loads DSPy; `dmipro --help` and the other commands must not.
    from dmipro.lm._sim import describe

    info = describe(task)
    if as_json:
        emit_json(info)
    else:
        console.print_json(json.dumps(info, default=str))


_mount()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app; a DmiproError exits 2 with a one-line reason."""
    args = sys.argv[1:] if argv is None else argv
    try:
        ensure_importable(trusted_code_paths())
        with json_stdout("--json" in args):
            app(args=args, standalone_mode=True)
    except DmiproError as exc:
        message = mask_passwords(" ".join(str(exc).split()))
        sys.stderr.write(f"error: {message}\n")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
