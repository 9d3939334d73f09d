"""Loading datasets named by a job: files, references and inline lists."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

from dmipro.config import get_settings
from dmipro.errors import DatasetError
from dmipro.refs import import_ref, is_ref

__all__ = ["dataset_digest", "fingerprint_records", "load_records"]

_SUFFIXES = (".jsonl", ".json", ".csv")


def load_records(source: Any, *, base_dir: Path, field: str) -> list[dict[str, Any]]:
    """The records a data source names, as a list of dicts (non-empty)."""
    if isinstance(source, list):
        records = source
    elif isinstance(source, str) and source.lower().endswith(_SUFFIXES):
        records = _read_file(_confined(base_dir, source, field), field)
    elif is_ref(source):
        records = _from_ref(source, field)
    else:
        raise DatasetError(
            f"{source!r} is neither a data file ({', '.join(_SUFFIXES)}), a 'module:attr' reference "
            "nor an inline list",
            field=field,
        )
    out = []
    for i, rec in enumerate(records):
        if hasattr(rec, "toDict"):
            rec = rec.toDict()
        if not isinstance(rec, dict):
            raise DatasetError(
                f"record {i} is a {type(rec).__name__}, expected an object of fields", field=field
            )
        out.append(rec)
    if not out:
        raise DatasetError("the dataset is empty; give it at least one example", field=field)
    try:
        json.dumps(out, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"records must hold plain JSON values ({exc})", field=field) from exc
    return out


def _confined(base_dir: Path, source: str, field: str) -> Path:
    """The data file ``source`` names, refused unless it lies in the job's directory or a data root.

    The path is resolved first (``..`` and symlinks followed), so neither can lead out.
    """
    path = (base_dir / source).resolve()
    roots = [base_dir.resolve(), *(Path(r).resolve() for r in get_settings().data_roots)]
    if not any(path.is_relative_to(root) for root in roots):
        raise DatasetError(
            f"{source!r} lies outside the job's directory {roots[0]}; put the data next to the job file, "
            "or the operator may allow its directory with DMIPRO_DATA_ROOTS",
            field=field,
        )
    return path


def _read_file(path: Path, field: str) -> list[Any]:
    if not path.is_file():
        raise DatasetError(f"file {path} does not exist; paths are relative to the job file", field=field)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM (Excel CSVs) is not data
        if path.suffix.lower() == ".jsonl":
            return [
                _json_line(line, n, path, field)
                for n, line in enumerate(text.splitlines(), 1)
                if line.strip()
            ]
        if path.suffix.lower() == ".json":
            data = json.loads(text)
            if not isinstance(data, list):
                raise DatasetError(f"{path} must hold a JSON list of records", field=field)
            return data
        return list(csv.DictReader(text.splitlines()))
    except DatasetError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as exc:
        raise DatasetError(f"cannot read {path}: {exc}", field=field) from exc


def _json_line(line: str, n: int, path: Path, field: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path} line {n} is not JSON ({exc.msg})", field=field) from exc


def _from_ref(ref: str, field: str) -> list[Any]:
    obj = import_ref(ref, field=field)
    if callable(obj):
        try:
            obj = obj()
        except Exception as exc:
            raise DatasetError(f"loader {ref} raised {type(exc).__name__}: {exc}", field=field) from exc
    if not isinstance(obj, list | tuple):
        raise DatasetError(f"{ref} gave a {type(obj).__name__}, expected a list of records", field=field)
    return list(obj)


def dataset_digest(records: list[Any]) -> str:
    """The SHA-256 (hex) of a dataset's canonical JSON: what the job store keys it by."""
    return hashlib.sha256(json.dumps(records, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def fingerprint_records(records: list[dict[str, Any]]) -> str:
    """A short stable hash of a dataset's content (the first 16 digits of its digest)."""
    return dataset_digest(records)[:16]
