"""``dmipro ab ...``: create, inspect, stop and promote experiments; offline comparisons; plans; plots.

Every command prints text, or exactly one JSON document on stdout with ``--json`` (any
printing by the libraries a command runs goes to stderr), and exits 2 with
``error: ...`` on stderr for a dmipro error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from dmipro._cli_util import cli_errors, write_json
from dmipro.ab.experiment import create, get, list_experiments
from dmipro.ab.monitor import monitor
from dmipro.ab.offline import compare
from dmipro.ab.plot import plot_lift
from dmipro.ab.stats import plan
from dmipro.errors import ExperimentError

__all__ = ["ab_app"]

ab_app = typer.Typer(
    name="ab",
    help="A/B experiments between registry versions: anytime-valid statistics, promote, roll back.",
    no_args_is_help=True,
)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of text.")]
ExpArg = Annotated[str, typer.Argument(help="Experiment name.", show_default=False)]


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _print_analysis(r: dict[str, Any]) -> None:
    typer.echo(f"experiment {r['name']} ({r['program']}, {r['state']}, {r['mode']}): {r['units']} units, "
               f"{r['outcomes']} outcomes")
    for arm in ("control", "treatment"):
        a = r[arm]
        typer.echo(f"  {arm:<9} @{a['version']}  n={a['n']:<7} mean={_fmt(a['mean'])} "
                   f"[{_fmt(a['ci_low'])}, {_fmt(a['ci_high'])}]")
    typer.echo(f"  lift {_fmt(r['lift'])} [{_fmt(r['lift_ci_low'])}, {_fmt(r['lift_ci_high'])}]  "
               f"p={_fmt(r['p_value'])}  srm p={_fmt(r['srm_p_value'])}")
    for name, g in r["guardrails"].items():
        typer.echo(f"  guardrail {name}: control {_fmt(g['control'])}, treatment {_fmt(g['treatment'])}, "
                   f"limit +{_fmt(g['limit'])}{'  VETO' if g['vetoed'] else ''}")
    for warning in r["warnings"]:
        typer.echo(f"  warning: {warning}")
    typer.echo(f"decision: {r['decision']}")


@ab_app.command("create")
@cli_errors
def create_command(
    name: ExpArg,
    control: Annotated[str, typer.Option(help="Control version, NAME@V (NAME: the deployed one).")],
    treatment: Annotated[str, typer.Option(help="Treatment version, NAME@V.")],
    split: Annotated[float, typer.Option(help="Treatment's share of units.")] = 0.5,
    metric: Annotated[str, typer.Option(help="Name of the recorded outcome.")] = "success",
    alpha: Annotated[float, typer.Option(help="False-positive rate, under any amount of peeking.")] = 0.05,
    mode: Annotated[str, typer.Option(help="sequential (anytime-valid) | fixed (one look).")] = "sequential",
    mde: Annotated[float | None, typer.Option(help="Smallest effect worth detecting (metric scale).")] = None,
    baseline: Annotated[float | None, typer.Option(help="Expected control rate, for the plan.")] = None,
    power: Annotated[float, typer.Option(help="Power of the plan.")] = 0.8,
    max_units: Annotated[int | None, typer.Option(help="Planned units (overrides the plan).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Create and start an experiment between two versions of a registered program."""
    exp = create(name, control=control, treatment=treatment, split=split, metric=metric, alpha=alpha,
                 mode=mode, mde=mde, baseline=baseline, power=power, max_units=max_units)
    if as_json:
        write_json(exp.to_json())
    else:
        typer.echo(f"experiment {exp.name}: {exp.control.spec} (control) vs {exp.treatment.spec} "
                   f"(treatment, {exp.split:.0%} of units), {mode}")


@ab_app.command("list")
@cli_errors
def list_command(as_json: JsonFlag = False) -> None:
    """List experiments, newest first."""
    exps = list_experiments()
    if as_json:
        write_json([e.to_json() for e in exps])
        return
    if not exps:
        typer.echo("no experiments")
    for e in exps:
        typer.echo(f"{e.name:<24} {e.control.spec} vs {e.treatment.spec}  {e.state:<9} "
                   f"decision: {e.decision or '-'}")


@ab_app.command("status")
@cli_errors
def status_command(name: ExpArg, as_json: JsonFlag = False) -> None:
    """Analyze an experiment now: per-arm means, lift, p-value, guardrails, SRM and the decision."""
    result = get(name).analyze()
    if as_json:
        write_json(result)
    else:
        _print_analysis(result)


@ab_app.command("stop")
@cli_errors
def stop_command(name: ExpArg, as_json: JsonFlag = False) -> None:
    """Stop splitting units (everyone gets the deployed version) and print the final analysis."""
    result = get(name).stop()
    if as_json:
        write_json(result)
    else:
        _print_analysis(result)


@ab_app.command("promote")
@cli_errors
def promote_command(
    name: ExpArg,
    arm: Annotated[str | None, typer.Option(help="control | treatment (default: the winner).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Deploy the winning version through the registry and end the experiment."""
    result = get(name).promote(arm)
    if as_json:
        write_json(result)
    else:
        typer.echo(f"deployed {result['spec']} ({result['arm']})" +
                   ("" if result["deployed"] else "; it was deployed already"))


@ab_app.command("offline")
@cli_errors
def offline_command(
    a: Annotated[str, typer.Argument(help="Version A, NAME@V.", show_default=False)],
    b: Annotated[str, typer.Argument(help="Version B, NAME@V.", show_default=False)],
    job: Annotated[Path, typer.Option("--job", help="Job file whose program, metric and data to use.")],
    split: Annotated[str, typer.Option(help="val | train | test")] = "test",
    executor: Annotated[str | None, typer.Option("--executor", "-e", help="Executor (default: the job's).")]
    = None,
    concurrency: Annotated[int | None, typer.Option(help="Executor slots (default: the job's).")] = None,
    alpha: Annotated[float, typer.Option(help="Significance level for 'better'.")] = 0.05,
    as_json: JsonFlag = False,
) -> None:
    """Score two versions on the same examples and test the difference (McNemar / paired)."""
    result = compare(a, b, job, split=split, executor=executor, concurrency=concurrency, alpha=alpha)
    if as_json:
        write_json(result)
        return
    typer.echo(f"{result['a']['version']}: {result['a']['score']:.2f}   {result['b']['version']}: "
               f"{result['b']['score']:.2f}   on {result['n']} {split} examples")
    typer.echo(f"diff (b - a) {result['diff']:+.2f} points "
               f"[{result['ci_low']:+.2f}, {result['ci_high']:+.2f}], "
               f"{result['test']} p={result['p_value']:.3g}")
    typer.echo(f"better: {result['better'] or 'no significant difference'}")


@ab_app.command("plan")
@cli_errors
def plan_command(
    baseline: Annotated[float, typer.Option(help="Control's expected rate (or mean, with --sd).")],
    mde: Annotated[float, typer.Option(help="Smallest absolute effect to detect.")],
    power: Annotated[float, typer.Option(help="Probability of detecting it.")] = 0.8,
    alpha: Annotated[float, typer.Option(help="False-positive rate.")] = 0.05,
    split: Annotated[float, typer.Option(help="Treatment's share of units.")] = 0.5,
    sd: Annotated[float | None, typer.Option(help="Standard deviation of a continuous metric.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Units needed: fixed-horizon (one look) and sequential (look any time)."""
    try:
        result = plan(baseline, mde, power=power, alpha=alpha, split=split, sd=sd)
    except ValueError as exc:
        raise ExperimentError(str(exc)) from exc
    if as_json:
        write_json(result)
        return
    labels = (("fixed", "fixed horizon (one look)"), ("sequential", "sequential (any number of looks)"))
    for key, label in labels:
        p = result[key]
        typer.echo(f"{label:<34} {p['total']:>8} units  ({p['control']} control, {p['treatment']} treatment)")


@ab_app.command("plot")
@cli_errors
def plot_command(
    name: ExpArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG file to write.")] = Path("lift.png"),
    as_json: JsonFlag = False,
) -> None:
    """Plot the cumulative lift with its confidence sequence over units, the decision marked."""
    info = plot_lift(get(name), out)
    if as_json:
        write_json(info)
    else:
        typer.echo(f"wrote {info['path']} ({info['units']} units, decision: {info['decision']})")


@ab_app.command("monitor")
@cli_errors
def monitor_command(
    name: Annotated[str, typer.Argument(help="Program (or experiment) name.", show_default=False)],
    reference: Annotated[int, typer.Option(help="Outcomes in the reference window.")] = 1000,
    window: Annotated[int, typer.Option(help="Outcomes in the recent window.")] = 1000,
    as_json: JsonFlag = False,
) -> None:
    """Run the regression check on the deployed version (rolls back with registry.auto_rollback)."""
    result = monitor(name, reference=reference, window=window).check()
    if as_json:
        write_json(result)
        return
    typer.echo(f"{result['program']}@{result['version']}: reference {_fmt(result['reference']['mean'])} "
               f"(n={result['reference']['n']}), recent {_fmt(result['recent']['mean'])} "
               f"(n={result['recent']['n']}), p={_fmt(result['p_value'])}: {result['status']}"
               + (f", {result['action']}" if result["action"] else ""))
