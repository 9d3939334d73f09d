"""The ``dmipro`` command line.

Every command that reports something has ``--json``. A :class:`~dmipro.errors.DmiproError`
ends the command with its message on one line of stderr and exit status 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from dmipro.errors import DmiproError

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

console = Console(stderr=True)

JobPath = Annotated[Path, typer.Argument(help="Job file (YAML).", show_default=False)]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object for scripts.")]
ExecutorOpt = Annotated[
    str | None, typer.Option("--executor", "-e", help="inline | thread (default: the job's executor).")
]


def emit_json(data: Any) -> None:
    """Print ``data`` as one line of JSON on stdout."""
    sys.stdout.write(json.dumps(data, default=str) + "\n")


@app.command()
def validate(job: JobPath, as_json: JsonFlag = False) -> None:
    """Validate a job file completely (refs, datasets, fields, LM config); print ok."""
    from dmipro.jobs import load_job

    loaded = load_job(job)
    if as_json:
        spec = loaded.spec
        emit_json({
            "ok": True,
            "name": spec.name,
            "trainset": len(spec.trainset),
            "valset": len(spec.valset) if isinstance(spec.valset, list) else 0,
        })
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


@sim_app.command("serve")
def sim_serve(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8900,
    latency_ms: Annotated[float, typer.Option(help="Simulated latency per call.")] = 0.0,
    latency_dist: Annotated[str, typer.Option(help="fixed | lognormal")] = "fixed",
    rate_limit_rate: Annotated[float, typer.Option(help="Fraction of calls answered 429.")] = 0.0,
    server_error_rate: Annotated[float, typer.Option(help="Fraction of calls answered 500.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Simulator seed.")] = 0,
) -> None:
    """Serve the simulator as an OpenAI-compatible API (/v1/chat/completions, /v1/models)."""
    from dmipro.lm.server import run_server

    console.print(f"simulated LM on http://{host}:{port}/v1 (models: sim-math, ...); Ctrl+C stops")
    run_server(host, port, latency_ms=latency_ms, latency_dist=latency_dist,
               rate_limit_rate=rate_limit_rate, server_error_rate=server_error_rate, seed=seed)


@sim_app.command("describe")
def sim_describe(task: Annotated[str, typer.Option(help="Simulated task.")] = "math",
                 as_json: JsonFlag = False) -> None:
    """Show the simulator's response surface: what helps, what hurts, where the optimum is."""
    from dmipro.lm._sim import describe

    info = describe(task)
    if as_json:
        emit_json(info)
    else:
        console.print_json(json.dumps(info, default=str))


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app; a DmiproError exits 2 with a one-line reason."""
    from dmipro.refs import ensure_importable

    ensure_importable([Path.cwd()])
    try:
        app(args=argv, standalone_mode=True)
    except DmiproError as exc:
        message = " ".join(str(exc).split())
        sys.stderr.write(f"error: {message}\n")
        raise SystemExit(2) from None
