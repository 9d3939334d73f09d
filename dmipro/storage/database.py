"""Program storage in the dmipro database (table ``dmipro_programs``, created by migration 0002)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import ValidationError
from sqlalchemy import JSON, Float, String, Text, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from dmipro.db import Base, session_scope
from dmipro.errors import DecodeError
from dmipro.storage.base import ProgramStore, StoredProgram
from dmipro.storage.program import state_bytes
from dmipro.storage.record import ProgramRecord

__all__ = ["DatabaseProgramStore", "ProgramRow", "insert_program", "record_from_row"]


class ProgramRow(Base):
    """One stored program. ``program`` is the exact text DSPy's ``save`` writes."""

    __tablename__ = "dmipro_programs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    job_id: Mapped[str | None] = mapped_column(String(64), index=True)
    program_ref: Mapped[str] = mapped_column(String(300))
    best_score: Mapped[float | None] = mapped_column(Float)
    program: Mapped[str] = mapped_column(Text)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON)
    history: Mapped[list[dict[str, Any]]] = mapped_column(JSON, deferred=True)
    """Read only when asked for (exports, ``registry show``): loading a program never parses it."""
    created_at: Mapped[float] = mapped_column(Float)


def insert_program(session: Session, program_id: str, record: ProgramRecord) -> ProgramRow:
    """Add ``record`` to ``session`` as a new row (committed with the session)."""
    meta = record.metadata
    row = ProgramRow(
        id=program_id,
        job_id=meta.job_id,
        program_ref=meta.program_ref,
        best_score=meta.best_score,
        program=state_bytes(record.program).decode("utf-8"),
        meta=meta.model_dump(mode="json"),
        history=record.history,
        created_at=meta.created_at.timestamp(),
    )
    session.add(row)
    return row


def record_from_row(row: ProgramRow, *, history: bool = True) -> ProgramRecord:
    """Decode a stored row; :class:`DecodeError` if it was tampered with.

    ``history=False`` leaves the trial history unread (an empty list in the record).
    """
    try:
        return ProgramRecord.model_validate(
            {"metadata": row.meta, "program": orjson.loads(row.program),
             "history": row.history if history else []}
        )
    except (ValidationError, orjson.JSONDecodeError) as exc:
        raise DecodeError(f"stored program {row.id} is corrupt: {exc}") from None


class DatabaseProgramStore(ProgramStore):
    """Programs in the dmipro database (SQLite by default, PostgreSQL when configured).

    Each save is one INSERT in its own transaction, so it is atomic and safe across
    threads and processes; ``url`` defaults to the configured database.
    """

    backend = "db"

    def __init__(self, url: str | None = None) -> None:
        self.url = url

    def _write(self, program_id: str, record: ProgramRecord) -> None:
        with session_scope(self.url) as session:
            insert_program(session, program_id, record)

    def _read(self, program_id: str) -> ProgramRecord | None:
        with session_scope(self.url) as session:
            row = session.get(ProgramRow, program_id)
            return None if row is None else record_from_row(row)

    def _list(self, job_id: str | None) -> list[StoredProgram]:
        query = select(
            ProgramRow.id,
            ProgramRow.job_id,
            ProgramRow.program_ref,
            ProgramRow.best_score,
            ProgramRow.created_at,
        )
        if job_id is not None:
            query = query.where(ProgramRow.job_id == job_id)
        with session_scope(self.url) as session:
            return [
                StoredProgram(
                    id=r.id,
                    job_id=r.job_id,
                    program_ref=r.program_ref,
                    best_score=r.best_score,
                    created_at=datetime.fromtimestamp(r.created_at, UTC),
                )
                for r in session.execute(query)
            ]
