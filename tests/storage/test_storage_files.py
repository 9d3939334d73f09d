"""Export and import of one program file, including DSPy's own files and hostile ones."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest

from dmipro.errors import DecodeError, DmiproError, StorageError
from dmipro.storage import (
    DSPY_FORMAT,
    FORMAT,
    MAX_DOCUMENT_BYTES,
    ProgramRecord,
    build_program,
    export_program,
    read_program_file,
)
from tests.storage.programs import optimized, predictions

REF = "examples.math_qa.program:build"


def _export(tmp_path: Path) -> dict[str, Any]:
    """A document in dmipro's earlier export format (still imported), for the hostile cases."""
    record = ProgramRecord.from_program(optimized(), program_ref=REF, best_score=80.0)
    return record.to_json()


def test_export_then_import_gives_the_same_record(tmp_path: Path) -> None:
    record = ProgramRecord.from_program(optimized(), program_ref=REF, best_score=80.0, history=[{"trial": 1}])
    path = export_program(record, tmp_path / "out" / "math_qa.json")
    document = json.loads(path.read_bytes())
    # DSPy's own file: its top-level keys, dmipro's part inside DSPy's metadata object.
    assert set(document) == {"predict", "metadata"}
    assert document["metadata"]["dmipro"]["format"] == DSPY_FORMAT
    assert "dependency_versions" in document["metadata"]
    assert read_program_file(path) == record


def test_an_earlier_export_still_imports(tmp_path: Path) -> None:
    record = ProgramRecord.from_program(optimized(), program_ref=REF, best_score=80.0, history=[{"trial": 1}])
    path = tmp_path / "v1.json"
    path.write_bytes(record.to_bytes())
    assert json.loads(path.read_bytes())["format"] == FORMAT
    assert read_program_file(path) == record


def test_a_file_saved_by_dspy_imports_with_a_program_reference(tmp_path: Path) -> None:
    original = optimized()
    original.save(str(tmp_path / "dspy.json"))
    record = read_program_file(tmp_path / "dspy.json", program_ref=REF)
    assert record.metadata.program_ref == REF
    assert record.metadata.signatures["predict"].outputs == ["reasoning", "answer"]
    assert predictions(build_program(record)) == predictions(original)


def test_a_file_saved_by_dspy_needs_a_program_reference(tmp_path: Path) -> None:
    optimized().save(str(tmp_path / "dspy.json"))
    with pytest.raises(DecodeError, match="--program"):
        read_program_file(tmp_path / "dspy.json")


def test_a_dspy_file_for_other_code_is_refused(tmp_path: Path) -> None:
    optimized().save(str(tmp_path / "dspy.json"))
    with pytest.raises(StorageError, match="predictors in the code but not saved"):
        read_program_file(tmp_path / "dspy.json", program_ref="tests.storage.programs:build_two_step")


def _write(tmp_path: Path, name: str, data: bytes | str) -> Path:
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


HOSTILE: dict[str, tuple[Any, str]] = {
    # case: (document or a callable(export) -> document, error pattern)
    "not json": ("{not json", "not JSON"),
    "a list": ("[1, 2]", "expected a JSON object"),
    "wrong marker": (lambda d: dict(d, format="dmipro.program/v9"), "unsupported program format"),
    "extra top-level key": (lambda d: dict(d, payload="x"), "unknown keys"),
    "program is a list": (lambda d: dict(d, program=[]), "program"),
    "score is text": (lambda d: dict(d, metadata=dict(d["metadata"], best_score="lots")), "best_score"),
    "demos not a list": (
        lambda d: dict(d, program=dict(d["program"], predict=dict(d["program"]["predict"], demos="x"))),
        "demos must be a list",
    ),
    "unknown metadata": (lambda d: dict(d, metadata=dict(d["metadata"], shell="rm -rf /")), "shell"),
    "ref outside allowlist": (
        lambda d: dict(d, metadata=dict(d["metadata"], program_ref="os:system")),
        "DMIPRO_ALLOWED_MODULES",
    ),
    "custom lm class": (
        lambda d: dict(
            d,
            program=dict(
                d["program"],
                predict=dict(d["program"]["predict"], lm={"_dspy_lm_class": "evil.mod:LM", "model": "x"}),
            ),
        ),
        "custom LM",
    ),
    "renamed predictor": (
        lambda d: dict(d, program={"other": d["program"]["predict"], "metadata": d["program"]["metadata"]}),
        "signatures names predictors",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_documents_are_rejected(tmp_path: Path, case: str) -> None:
    spec, pattern = HOSTILE[case]
    data = json.dumps(spec(_export(tmp_path))) if callable(spec) else spec
    path = _write(tmp_path, "in.json", data)
    with pytest.raises(DmiproError, match=pattern):
        read_program_file(path)


def test_pickles_are_never_loaded(tmp_path: Path) -> None:
    blob = pickle.dumps({"x": 1})
    with pytest.raises(DecodeError, match="pickle"):
        read_program_file(_write(tmp_path, "program.pkl", blob))
    with pytest.raises(DecodeError, match="pickle"):
        read_program_file(_write(tmp_path, "program.json", blob))
    saved_program = tmp_path / "saved_program"
    saved_program.mkdir()
    (saved_program / "program.pkl").write_bytes(blob)
    with pytest.raises(DecodeError, match="directory"):
        read_program_file(saved_program)


def test_huge_files_are_rejected_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "huge.json"
    with open(path, "wb") as fh:
        fh.truncate(MAX_DOCUMENT_BYTES + 1)
    with pytest.raises(DecodeError, match="at most"):
        read_program_file(path)


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DecodeError, match="cannot read"):
        read_program_file(tmp_path / "nope.json")


def test_a_broken_dmipro_part_in_an_export_is_refused(tmp_path: Path) -> None:
    record = ProgramRecord.from_program(optimized(), program_ref=REF, best_score=80.0)
    good = record.to_dspy_json()
    cases = {
        "marker": (
            dict(good["metadata"]["dmipro"], format="dmipro.program/v9"),
            "unsupported program format",
        ),
        "extra key": (dict(good["metadata"]["dmipro"], payload="x"), "unknown keys in metadata.dmipro"),
        "not an object": ("x", "metadata.dmipro must be a JSON object"),
    }
    for name, (part, pattern) in cases.items():
        path = _write(
            tmp_path, f"{name}.json", json.dumps(dict(good, metadata=dict(good["metadata"], dmipro=part)))
        )
        with pytest.raises(DecodeError, match=pattern):
            read_program_file(path)
