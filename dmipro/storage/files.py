"""Exporting one program to a JSON file and importing one back.

An export is DSPy's own program file (what ``program.save("x.json")`` writes, so plain
``program.load(path)`` reads it) with dmipro's metadata and history under
``metadata.dmipro``. An import accepts that, dmipro's earlier ``dmipro.program/v1``
documents, and the file DSPy's own ``program.save`` writes, given the program reference
that rebuilds the module.
Nothing is ever unpickled: ``.pkl`` files and DSPy's ``save_program=True`` directories are
refused. Every check (size, JSON, shape, reference allowlist, signature fields) runs before
the caller writes anything.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from dmipro.errors import DecodeError, DmiproError, RefError, StorageError
from dmipro.events import bus
from dmipro.storage.directory import atomic_write
from dmipro.storage.program import build_program, check_signatures, instantiate, predictor_signatures
from dmipro.storage.record import (
    DSPY_FORMAT,
    FORMAT,
    MAX_DOCUMENT_BYTES,
    ProgramMetadata,
    ProgramRecord,
    check_program_state,
    dmipro_version,
    is_dspy_export,
)

__all__ = ["export_program", "read_program_file", "record_from_dspy_state"]

_PICKLE_SUFFIXES = frozenset({".pkl", ".pickle", ".pck", ".cloudpickle", ".joblib"})


def export_program(record: ProgramRecord, path: Path | str) -> Path:
    """Write ``record`` as DSPy's program JSON with dmipro's part inside (atomically); return the path."""
    path = Path(path)
    try:
        atomic_write(path, record.to_dspy_bytes())
    except OSError as exc:
        err = StorageError(f"cannot write {path}: {exc.strerror or exc}")
        bus.emit("dspy.storage.error", operation="export", path=str(path), error=str(err))
        raise err from exc
    bus.emit("dspy.storage.save", job_id=record.metadata.job_id, path=str(path), backend="file")
    return path


def read_program_file(
    path: Path | str, *, program_ref: str | None = None, verify: bool = True
) -> ProgramRecord:
    """Read a program file: a dmipro export, or a DSPy ``program.save()`` JSON with ``program_ref``.

    ``program_ref`` overrides the reference stored in an export. With ``verify`` (the
    default) the program is rebuilt from the code once, so a reference outside the
    allowlist or a changed signature is an error now rather than at load time.
    """
    path = Path(path)
    try:
        record = _read(path, program_ref)
        if verify:
            build_program(record)
    except DmiproError as exc:
        bus.emit("dspy.storage.error", operation="import", path=str(path), error=str(exc))
        raise
    bus.emit("dspy.storage.load", job_id=record.metadata.job_id, path=str(path), backend="file")
    return record


def _read(path: Path, program_ref: str | None) -> ProgramRecord:
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise DecodeError(
            f"{path}: pickle files are never loaded; save the program with program.save('x.json')"
        )
    try:
        info = os.stat(path)
    except OSError as exc:
        raise DecodeError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(info.st_mode):
        hint = (
            " (a DSPy save_program=True directory holds a pickle, which is never loaded)"
            if (path / "program.pkl").exists()
            else ""
        )
        raise DecodeError(f"{path} is a directory, not a program JSON file{hint}")
    if not stat.S_ISREG(info.st_mode):
        raise DecodeError(f"{path} is not a regular file")
    if info.st_size > MAX_DOCUMENT_BYTES:
        raise DecodeError(
            f"{path} is {info.st_size} bytes; a program file may be at most {MAX_DOCUMENT_BYTES}"
        )
    with open(path, "rb") as fh:
        data = fh.read(MAX_DOCUMENT_BYTES + 1)
    if len(data) > MAX_DOCUMENT_BYTES:
        raise DecodeError(f"{path} is larger than {MAX_DOCUMENT_BYTES} bytes")
    if data[:1] == b"\x80":
        raise DecodeError(f"{path} looks like a pickle; pickled programs are never loaded")
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"{path} is not JSON ({exc})") from None
    if not isinstance(document, dict):
        raise DecodeError(f"{path}: expected a JSON object, got {type(document).__name__}")
    try:
        if "format" in document or is_dspy_export(document):
            return ProgramRecord.from_json(document, program_ref=program_ref)
        if "metadata" in document:
            if program_ref is None:
                raise DecodeError(
                    f"{path} is a DSPy program file without dmipro metadata; name the code that builds "
                    "the module with --program package.module:attr"
                )
            return record_from_dspy_state(document, program_ref=program_ref)
    except DecodeError as exc:
        raise DecodeError(f"{path}: {exc}") from None
    raise DecodeError(
        f"{path} is neither a dmipro export ({DSPY_FORMAT} or {FORMAT}) nor a DSPy program file"
    )


def record_from_dspy_state(state: Mapping[str, Any], *, program_ref: str) -> ProgramRecord:
    """Wrap a DSPy saved-program dict in a record, taking field names from the code at ``program_ref``.

    The code must have the same predictors with the same number of fields as the state.
    """
    try:
        check_program_state(state)
    except ValueError as exc:
        raise DecodeError(f"not a DSPy program file: {exc}") from None
    try:
        program = instantiate(program_ref)
    except RefError as exc:
        raise StorageError(f"cannot rebuild the program: {exc}") from exc
    check_signatures(program, state, None, program_ref=program_ref)
    versions = state["metadata"]["dependency_versions"]
    try:
        metadata = ProgramMetadata(
            program_ref=program_ref,
            dspy_version=str(versions.get("dspy", "unknown"))[:200],
            dmipro_version=dmipro_version(),
            signatures=predictor_signatures(program),  # type: ignore[arg-type]
            extra={"imported_from": "dspy"},
        )
        return ProgramRecord(metadata=metadata, program=dict(state), history=[])
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise DecodeError(f"not a valid DSPy program file: {exc}") from None
