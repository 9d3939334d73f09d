"""``dmipro registry ...``, ``dmipro export`` and ``dmipro import``.

``registry_app`` is mounted as ``dmipro registry``; ``export_command`` and
``import_command`` are registered as top-level commands. Every command prints text, or
JSON with ``--json``, and exits 2 with ``error: ...`` on stderr for a dmipro error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from dmipro._cli_util import cli_errors, write_json
from dmipro.errors import RegistryError
from dmipro.registry.names import format_spec, parse_spec, validate_name
from dmipro.registry.registry import Registry
from dmipro.registry.values import Deployment
from dmipro.storage.files import export_program, read_program_file
from dmipro.storage.record import state_predictors

__all__ = ["export_command", "import_command", "registry_app"]

registry_app = typer.Typer(
    name="registry",
    help="Named, versioned optimized programs: list, show, deploy, roll back, compare.",
    no_args_is_help=True,
)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


def _echo_json(value: Any) -> None:
    write_json(value, indent=2)


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _version(value: int | None) -> str:
    return "-" if value is None else str(value)


def _one_line(text: str, width: int = 100) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


@registry_app.command("list")
@cli_errors
def list_command(json_out: JsonFlag = False) -> None:
    """List registered programs with their newest and deployed versions."""
    names = Registry().list_names()
    if json_out:
        _echo_json([n.to_json() for n in names])
        return
    if not names:
        typer.echo("no programs registered")
        return
    width = max(len("NAME"), *(len(n.name) for n in names))
    typer.echo(f"{'NAME':<{width}}  LATEST  DEPLOYED  UPDATED")
    for n in names:
        typer.echo(
            f"{n.name:<{width}}  {n.latest_version:>6}  {_version(n.deployed_version):>8}  "
            f"{n.updated_at.isoformat(timespec='seconds')}"
        )


@registry_app.command("show")
@cli_errors
def show_command(
    spec: Annotated[str, typer.Argument(metavar="NAME[@V]", help="A name (its deployed version) or NAME@V.")],
    json_out: JsonFlag = False,
) -> None:
    """Show one version: scores, origin, and each predictor's instructions and demos."""
    reg = Registry()
    info = reg.show(spec)
    record = reg.get(info.spec)
    meta = record.metadata
    if json_out:
        _echo_json(
            {
                "version": info.to_json(),
                "metadata": meta.model_dump(mode="json"),
                "program": record.program,
                "history": record.history,
            }
        )
        return
    lm = meta.lm or {}
    lm_text = " ".join([str(lm.get("model", "-"))] + [f"{k}={v}" for k, v in lm.items() if k != "model"])
    lines = [
        f"{info.spec}" + ("  (deployed)" if info.deployed else ""),
        f"  program:     {meta.program_ref}",
        f"  program id:  {info.program_id}",
        f"  job:         {meta.job_id or '-'}",
        f"  best score:  {_score(meta.best_score)}  (baseline {_score(meta.baseline_score)})",
        f"  lm:          {lm_text if meta.lm else '-'}",
        f"  created:     {info.created_at.isoformat(timespec='seconds')} by {info.created_by}",
        f"  versions:    dspy {meta.dspy_version}, dmipro {meta.dmipro_version}",
        f"  trials:      {len(record.history)}",
    ]
    for pname, pstate in state_predictors(record.program).items():
        fields = meta.signatures.get(pname)
        sig = f"{', '.join(fields.inputs)} -> {', '.join(fields.outputs)}" if fields else "?"
        lines.append(f"  {pname}: {sig}; {len(pstate.get('demos', []))} demos")
        lines.append(f"    {_one_line(pstate['signature']['instructions'])}")
    typer.echo("\n".join(lines))


def _deployment_line(dep: Deployment) -> str:
    return (
        f"{dep.at.isoformat(timespec='seconds')}  {dep.action:<8}  "
        f"{_version(dep.from_version):>4} -> {_version(dep.to_version):<4}  by {dep.actor}"
    )


@registry_app.command("deploy")
@cli_errors
def deploy_command(
    spec: Annotated[str, typer.Argument(metavar="NAME@V", help="The version to deploy.")],
    json_out: JsonFlag = False,
) -> None:
    """Deploy a version; apps loading NAME get it from now on."""
    name, version = parse_spec(spec)
    if version is None:
        raise RegistryError(f"say which version to deploy: {name}@N")
    dep = Registry().deploy(name, version)
    if json_out:
        _echo_json(
            {
                "name": name,
                "version": version,
                "changed": dep is not None,
                "deployment": dep.to_json() if dep else None,
            }
        )
    elif dep is None:
        typer.echo(f"{format_spec(name, version)} is already deployed")
    else:
        typer.echo(f"deployed {format_spec(name, version)} (was {_version(dep.from_version)})")


@registry_app.command("rollback")
@cli_errors
def rollback_command(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The program to roll back.")],
    json_out: JsonFlag = False,
) -> None:
    """Deploy again the version that was deployed before the current one."""
    dep = Registry().rollback(name)
    if json_out:
        _echo_json(dep.to_json())
    else:
        typer.echo(
            f"rolled {name} back from version {_version(dep.from_version)} to {_version(dep.to_version)}"
        )


@registry_app.command("history")
@cli_errors
def history_command(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The program whose deployments to list.")],
    json_out: JsonFlag = False,
) -> None:
    """List every deploy and rollback of a program, oldest first."""
    deps = Registry().history(name)
    if json_out:
        _echo_json([d.to_json() for d in deps])
    elif not deps:
        typer.echo(f"{name} has never been deployed")
    else:
        typer.echo("\n".join(_deployment_line(d) for d in deps))


@registry_app.command("diff")
@cli_errors
def diff_command(
    a: Annotated[str, typer.Argument(metavar="NAME@A", help="The older version.")],
    b: Annotated[str, typer.Argument(metavar="NAME@B", help="The newer version.")],
    json_out: JsonFlag = False,
) -> None:
    """Compare two versions: instructions and demos per predictor."""
    result = Registry().diff(a, b)
    if json_out:
        _echo_json(result)
        return
    scores = result["best_score"]
    lines = [f"{result['a']} -> {result['b']}  (best score {_score(scores['a'])} -> {_score(scores['b'])})"]
    if not result["changed"]:
        lines.append("no differences in instructions or demos")
    for pname, entry in result["predictors"].items():
        if not entry["changed"]:
            continue
        lines.append(pname + (f"  (only in {entry['only_in']})" if entry["only_in"] else ""))
        if entry["instructions"]["changed"]:
            lines.append("  instructions:")
            lines.extend(f"    {line}" for line in entry["instructions"]["diff"])
        demos = entry["demos"]
        if demos["changed"]:
            lines.append(
                f"  demos: {demos['a']} -> {demos['b']} (+{len(demos['added'])} -{len(demos['removed'])})"
            )
    typer.echo("\n".join(lines))


@cli_errors
def export_command(
    ref: Annotated[str, typer.Argument(metavar="NAME[@V]", help="A name (its deployed version) or NAME@V.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The JSON file to write.")],
) -> None:
    """Write one registered version as DSPy's own program file (plain program.load reads it).

    dmipro's metadata and trial history go inside DSPy's ``metadata`` object, under ``dmipro``.
    """
    reg = Registry()
    info = reg.show(ref)
    export_program(reg.get(info.spec), output)
    typer.echo(f"exported {info.spec} to {output}")


@cli_errors
def import_command(
    path: Annotated[Path, typer.Argument(help="A dmipro export (any version), or a program.save() file.")],
    name: Annotated[str, typer.Option("--name", help="The registry name to add it under.")],
    program: Annotated[
        str | None,
        typer.Option(
            "--program", help="package.module:attr that builds the module (required for DSPy files)."
        ),
    ] = None,
) -> None:
    """Register a program file as the next version of NAME."""
    validate_name(name)
    record = read_program_file(path, program_ref=program)
    info = Registry().register(name, record)
    typer.echo(f"imported {path} as {info.spec}" + ("  (deployed)" if info.deployed else ""))
