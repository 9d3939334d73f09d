"""Program storage as a directory of export documents, one JSON file per program.

Layout: ``<root>/programs/<id>.json``, each file a complete ``dmipro.program/v1``
document (so ``dmipro import`` reads it as it is). Writes go to a temporary file in the
same directory and are moved into place with ``os.replace`` under a ``filelock`` lock,
so a reader never sees half a file.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import suppress
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from filelock import FileLock

from dmipro.errors import DecodeError, StorageError
from dmipro.storage.base import ProgramStore, StoredProgram
from dmipro.storage.record import MAX_DOCUMENT_BYTES, ProgramRecord

__all__ = ["DirectoryProgramStore", "atomic_write", "confined", "save_program_file"]

_LOCK_TIMEOUT = 60.0


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling file and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


def confined(root: Path, relative: Path | str) -> Path:
    """``root / relative``, refusing any path that would land outside ``root``.

    The parent directories are resolved (following symlinks) and must stay under the
    resolved root; the file name itself is never followed (writes replace it).
    """
    root = root.resolve()
    candidate = root / relative
    parent = candidate.parent.resolve()
    if candidate.name in ("", ".", "..") or not parent.is_relative_to(root):
        raise StorageError(f"{str(relative)[:200]!r} would be written outside {root}; refusing")
    return parent / candidate.name


def save_program_file(program: Any, path: Path, *, root: Path | None = None) -> Path:
    """Write ``program.save()``'s JSON to ``path`` (under ``root`` if given), atomically.

    The JSON goes to a temporary sibling first and is moved into place with
    ``os.replace``, which replaces a symlink planted at ``path`` instead of writing
    through it; a reader never sees half a file.
    """
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
        (root / path).parent.mkdir(parents=True, exist_ok=True)  # a planted link is caught right below
        path = confined(root, path)
    else:
        path = path.parent.resolve() / path.name
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
    os.close(fd)
    try:
        program.save(tmp)
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    return path


class DirectoryProgramStore(ProgramStore):
    """Programs as JSON files under ``root`` (the ``storage`` setting when it is a path).

    Safe across threads and processes: each write holds ``<root>/.lock`` and replaces
    its file atomically; reads need no lock.
    """

    backend = "directory"

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.programs = self.root / "programs"

    def _path(self, program_id: str) -> Path:
        return self.programs / f"{program_id}.json"

    def _write(self, program_id: str, record: ProgramRecord) -> None:
        data = record.to_bytes()
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root / ".lock"), timeout=_LOCK_TIMEOUT):
            path = self._path(program_id)
            if path.exists():
                raise StorageError(f"{path} already exists; refusing to overwrite a stored program")
            atomic_write(path, data)

    def _read(self, program_id: str) -> ProgramRecord | None:
        path = self._path(program_id)
        try:
            with open(path, "rb") as fh:
                data = fh.read(MAX_DOCUMENT_BYTES + 1)
        except FileNotFoundError:
            return None
        try:
            return ProgramRecord.from_bytes(data)
        except DecodeError as exc:
            raise DecodeError(f"{path}: {exc}") from None

    def _list(self, job_id: str | None) -> list[StoredProgram]:
        if not self.programs.is_dir():
            return []
        out = []
        for path in self.programs.glob("*.json"):
            if path.name.startswith("."):
                continue
            try:
                meta = orjson.loads(path.read_bytes()).get("metadata", {})
                record_job = meta.get("job_id")
                if job_id is not None and record_job != job_id:
                    continue
                out.append(
                    StoredProgram(
                        id=path.stem,
                        job_id=record_job,
                        program_ref=meta["program_ref"],
                        best_score=meta.get("best_score"),
                        created_at=datetime.fromisoformat(meta["created_at"]),
                    )
                )
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise DecodeError(f"{path} is not a stored program ({exc})") from None
        return out
