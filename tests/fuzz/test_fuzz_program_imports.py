"""Fuzzed program files for ``dmipro import`` (storage import): each one is registered whole or
refused with a DmiproError, and a refused file leaves nothing in the registry or the program store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from typer.testing import CliRunner

from dmipro.errors import DmiproError
from tests.fuzz.strategies import FUZZ, JSON, mutated

SETTINGS = FUZZ.__class__(
    FUZZ, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
REF = "examples.math_qa.program:build"
TABLES = (
    "dmipro_registry_names",
    "dmipro_registry_versions",
    "dmipro_registry_deployments",
    "dmipro_programs",
)


def _documents() -> tuple[dict[str, Any], dict[str, Any]]:
    from dmipro.storage.files import record_from_dspy_state
    from dmipro.storage.program import program_state
    from tests.storage.programs import optimized

    state = program_state(optimized())
    return record_from_dspy_state(state, program_ref=REF).to_json(), json.loads(json.dumps(state))


EXPORT, DSPY_STATE = _documents()


def stored_rows() -> int:
    from dmipro.db import get_engine

    engine = get_engine()
    with engine.connect() as conn:
        return sum(
            conn.execute(sa.select(sa.func.count()).select_from(sa.table(t))).scalar_one() for t in TABLES
        )


def import_or_refuse(path: Path, program_ref: str | None) -> None:
    """The library's import: read, check, register; a refusal writes nothing."""
    from dmipro.registry import Registry
    from dmipro.storage.files import read_program_file

    before = stored_rows()
    try:
        record = read_program_file(path, program_ref=program_ref)
        info = Registry().register("fuzzed", record)
    except DmiproError as exc:
        assert str(exc).strip()
        assert stored_rows() == before
        return
    # What was registered loads back with plain DSPy state on the program it names.
    assert Registry().load(info.spec) is not None


@SETTINGS
@given(doc=mutated(EXPORT))
def test_a_mutated_export_is_registered_whole_or_refused(tmp_path: Path, doc: Any) -> None:
    path = tmp_path / "program.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    import_or_refuse(path, None)


@SETTINGS
@given(
    doc=mutated(DSPY_STATE),
    ref=st.sampled_from(
        [
            REF,
            "os:system",
            "examples.math_qa.program:exact_match",
            "tests.storage.programs:build_renamed",
            "nope:x",
        ]
    ),
)
def test_a_mutated_dspy_file_is_registered_whole_or_refused(tmp_path: Path, doc: Any, ref: str) -> None:
    path = tmp_path / "program.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    import_or_refuse(path, ref)


@SETTINGS
@given(data=st.binary(max_size=300) | JSON.map(lambda v: json.dumps(v).encode()))
def test_any_bytes_as_a_program_file_are_refused_on_the_cli(tmp_path: Path, data: bytes) -> None:
    from dmipro.cli import app

    path = tmp_path / "program.json"
    path.write_bytes(data)
    result = CliRunner().invoke(app, ["import", str(path), "--name", "fuzzed", "--program", REF])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
    assert stored_rows() == 0


@pytest.mark.parametrize("doc", [EXPORT, DSPY_STATE], ids=["export", "dspy"])
def test_the_unmutated_documents_import(tmp_path: Path, doc: dict[str, Any]) -> None:
    """The fuzzing starts from documents that do import (else it would only test refusals)."""
    path = tmp_path / "program.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    import_or_refuse(path, None if doc is EXPORT else REF)
    assert stored_rows() > 0
