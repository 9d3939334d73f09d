"""The program store's base class: the contract every backend (database, directory) implements."""

from __future__ import annotations

import builtins
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn, TypeVar

from dmipro.errors import DmiproError, StorageError
from dmipro.events import bus
from dmipro.storage.record import ProgramRecord

__all__ = ["ProgramStore", "StoredProgram"]

_ID = re.compile(r"^[0-9a-f]{32}$")
T = TypeVar("T")


@dataclass(frozen=True)
class StoredProgram:
    """One line of a store listing."""

    id: str
    job_id: str | None
    program_ref: str
    best_score: float | None
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "id": self.id,
            "job_id": self.job_id,
            "program_ref": self.program_ref,
            "best_score": self.best_score,
            "created_at": self.created_at.isoformat(),
        }


class ProgramStore:
    """Keeps optimized programs (:class:`ProgramRecord`) under generated ids.

    Contract: ``save()`` writes a whole record under a fresh id and returns the id; a
    reader sees a record completely or not at all, and a saved record never changes.
    ``load(id)`` returns what was saved; ``list()`` is newest first. Every method is safe
    to call from several threads and processes at once. A backend implements ``_write``,
    ``_read`` and ``_list``; this class checks ids, emits ``dspy.storage.save|load|error``
    once per call and turns any backend failure into :class:`StorageError`.
    """

    backend: str = "base"

    def save(self, record: ProgramRecord) -> str:
        """Store ``record`` and return its new id."""
        if not isinstance(record, ProgramRecord):
            raise StorageError(f"expected a ProgramRecord, got {type(record).__name__}")
        program_id = uuid.uuid4().hex
        self._guard("save", program_id, lambda: self._write(program_id, record))
        bus.emit(
            "dspy.storage.save",
            job_id=record.metadata.job_id,
            program_id=program_id,
            backend=self.backend,
            program_ref=record.metadata.program_ref,
            best_score=record.metadata.best_score,
        )
        return program_id

    def load(self, program_id: str) -> ProgramRecord:
        """The record saved under ``program_id``; :class:`StorageError` if there is none."""
        if not isinstance(program_id, str) or not _ID.match(program_id):
            self._error("load", str(program_id), StorageError(f"{program_id!r} is not a program id"))
        record = self._guard("load", program_id, lambda: self._read(program_id))
        if record is None:
            self._error("load", program_id, StorageError(f"no stored program with id {program_id}"))
        bus.emit(
            "dspy.storage.load", job_id=record.metadata.job_id, program_id=program_id, backend=self.backend
        )
        return record

    def list(self, *, job_id: str | None = None) -> list[StoredProgram]:
        """Stored programs, newest first, optionally only those of one job."""
        items = self._guard("list", "", lambda: self._list(job_id))
        return sorted(items, key=lambda p: (p.created_at, p.id), reverse=True)

    def _guard(self, op: str, program_id: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except DmiproError as exc:
            self._error(op, program_id, exc)
        except Exception as exc:
            err = StorageError(
                f"{op} failed in the {self.backend} program store: {type(exc).__name__}: {exc}"
            )
            err.__cause__ = exc
            self._error(op, program_id, err)

    def _error(self, op: str, program_id: str, exc: DmiproError) -> NoReturn:
        bus.emit(
            "dspy.storage.error", operation=op, program_id=program_id, backend=self.backend, error=str(exc)
        )
        raise exc

    def _write(self, program_id: str, record: ProgramRecord) -> None:
        """Persist ``record`` atomically under ``program_id``."""
        raise NotImplementedError

    def _read(self, program_id: str) -> ProgramRecord | None:
        """The record under ``program_id``, or None."""
        raise NotImplementedError

    def _list(self, job_id: str | None) -> builtins.list[StoredProgram]:
        """Summaries of every stored record (of ``job_id`` when given), in any order."""
        raise NotImplementedError
