"""The registry commands, mounted on a local Typer app as the dmipro CLI mounts them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from sqlalchemy import func, select
from typer.testing import CliRunner

import dmipro.registry as registry
from dmipro.db import session_scope
from dmipro.registry.cli import export_command, import_command, registry_app
from dmipro.storage import ProgramRecord, build_program
from dmipro.storage.database import ProgramRow
from tests.storage.programs import optimized, predictions

REF = "examples.math_qa.program:build"

app = typer.Typer()
app.add_typer(registry_app, name="registry")
app.command("export")(export_command)
app.command("import")(import_command)


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def _register(n: int) -> None:
    for i in range(n):
        registry.register(
            "math_qa",
            ProgramRecord.from_program(
                optimized(f"Instruction {i}.", n_demos=i + 1), program_ref=REF, best_score=60.0 + i
            ),
        )


def _nothing_stored() -> bool:
    with session_scope() as s:
        return registry.list_names() == [] and s.scalar(select(func.count()).select_from(ProgramRow)) == 0


def test_list_show_deploy_rollback_history_diff() -> None:
    assert run("registry", "list") == (0, "no programs registered\n", "")
    _register(2)
    code, out, _ = run("registry", "list", "--json")
    assert code == 0 and json.loads(out)[0]["latest_version"] == 2

    assert run("registry", "deploy", "math_qa@1")[0] == 0
    code, out, _ = run("registry", "deploy", "math_qa@2")
    assert code == 0 and "deployed math_qa@2 (was 1)" in out
    assert "already deployed" in run("registry", "deploy", "math_qa@2")[1]

    code, out, _ = run("registry", "show", "math_qa")
    assert code == 0 and out.startswith("math_qa@2  (deployed)") and "Instruction 1." in out
    shown = json.loads(run("registry", "show", "math_qa@1", "--json")[1])
    assert shown["version"]["version"] == 1 and shown["program"]["predict"]["signature"]["instructions"] == (
        "Instruction 0."
    )

    code, out, _ = run("registry", "rollback", "math_qa", "--json")
    assert code == 0 and json.loads(out)["to_version"] == 1
    history = json.loads(run("registry", "history", "math_qa", "--json")[1])
    assert [(h["action"], h["from_version"], h["to_version"]) for h in history] == [
        ("deploy", None, 1),
        ("deploy", 1, 2),
        ("rollback", 2, 1),
    ]
    assert "rollback" in run("registry", "history", "math_qa")[1]

    code, out, _ = run("registry", "diff", "math_qa@1", "math_qa@2")
    assert code == 0 and "-Instruction 0." in out and "+Instruction 1." in out and "demos: 1 -> 2" in out
    assert json.loads(run("registry", "diff", "math_qa@1", "math_qa@2", "--json")[1])["changed"] is True


@pytest.mark.parametrize(
    "args, message",
    [
        (("registry", "show", "ghost"), "no program named 'ghost'"),
        (("registry", "deploy", "math_qa"), "say which version"),
        (("registry", "deploy", "math_qa@0"), "invalid version"),
        (("registry", "rollback", "../x"), "invalid program name"),
        (("registry", "history", "ghost"), "no program named"),
        (("export", "ghost", "-o", "x.json"), "no program named"),
    ],
)
def test_errors_exit_2_with_one_line(args: tuple[str, ...], message: str) -> None:
    code, out, err = run(*args)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_export_then_import_under_another_name(tmp_path: Path) -> None:
    _register(1)
    registry.deploy("math_qa", 1)
    code, out, _ = run("export", "math_qa", "-o", str(tmp_path / "math_qa.json"))
    assert code == 0 and "exported math_qa@1" in out
    code, out, _ = run("import", str(tmp_path / "math_qa.json"), "--name", "math_qa.copy")
    assert code == 0 and "as math_qa.copy@1" in out
    assert registry.get("math_qa.copy@1").program == registry.get("math_qa@1").program


def test_a_file_saved_by_dspy_imports_and_loads(tmp_path: Path) -> None:
    original = optimized()
    original.save(str(tmp_path / "dspy.json"))
    code, _, err = run("import", str(tmp_path / "dspy.json"), "--name", "from_dspy")
    assert code == 2 and "--program" in err and _nothing_stored()
    code, out, _ = run("import", str(tmp_path / "dspy.json"), "--name", "from_dspy", "--program", REF)
    assert code == 0 and "from_dspy@1" in out
    assert predictions(registry.load("from_dspy@1")) == predictions(original)
    assert predictions(build_program(registry.get("from_dspy@1"))) == predictions(original)


def _hostile_files(tmp_path: Path) -> list[tuple[Path, str]]:
    good = json.loads(ProgramRecord.from_program(optimized(), program_ref=REF).to_bytes())
    cases = {
        "text.json": b"this is not json",
        "marker.json": json.dumps(dict(good, format="other/v1")).encode(),
        "types.json": json.dumps(dict(good, history="not a list")).encode(),
        "ref.json": json.dumps(
            dict(good, metadata=dict(good["metadata"], program_ref="subprocess:run"))
        ).encode(),
        "program.pkl": b"\x80\x04\x95...",
        "pickle.json": b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94.",
    }
    out = []
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        out.append((tmp_path / name, "math_qa"))
    (tmp_path / "good.json").write_bytes(json.dumps(good).encode())
    out += [(tmp_path / "good.json", "../../etc/cron.d/x"), (tmp_path / "good.json", "x\x1b[31m")]
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as fh:
        fh.truncate(64 * 1024 * 1024)
    out.append((huge, "math_qa"))
    return out


def test_hostile_imports_are_rejected_and_nothing_is_written(tmp_path: Path) -> None:
    for path, name in _hostile_files(tmp_path):
        code, out, err = run("import", str(path), "--name", name)
        assert code == 2, (path.name, name, out, err)
        assert err.startswith("error: "), err
        assert _nothing_stored(), path.name
