"""A/B tables (created by migration 0003_ab)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Boolean, Float, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from dmipro.db import Base

__all__ = ["ExperimentRow", "OutcomeRow"]


class ExperimentRow(Base):
    """One experiment between two versions of a registered program; its settings and its state."""

    __tablename__ = "dmipro_ab_experiments"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    program: Mapped[str] = mapped_column(String(128))
    control_version: Mapped[int] = mapped_column(Integer)
    treatment_version: Mapped[int] = mapped_column(Integer)
    split: Mapped[float] = mapped_column(Float)
    metric: Mapped[str] = mapped_column(String(64))
    alpha: Mapped[float] = mapped_column(Float)
    salt: Mapped[str] = mapped_column(String(64))
    settings: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16))
    decision: Mapped[str | None] = mapped_column(String(16))
    promoted_version: Mapped[int | None] = mapped_column(Integer)
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    stopped_at: Mapped[float | None] = mapped_column(Float)


class OutcomeRow(Base):
    """One recorded outcome of one unit, served by ``program@version``.

    ``experiment`` and ``arm`` are set while an experiment runs; outcomes recorded after it
    (the production loop) carry ``arm = "production"``, and monitored outcomes no experiment.
    """

    __tablename__ = "dmipro_ab_outcomes"
    __table_args__ = (
        Index("ix_dmipro_ab_outcomes_experiment", "experiment", "id"),
        Index("ix_dmipro_ab_outcomes_program", "program", "version", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    experiment: Mapped[str | None] = mapped_column(String(128))
    arm: Mapped[str] = mapped_column(String(16))
    program: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(Integer)
    unit_id: Mapped[str] = mapped_column(String(256))
    value: Mapped[float] = mapped_column(Float)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    tokens: Mapped[int | None] = mapped_column(Integer)
    cost_usd: Mapped[float | None] = mapped_column(Float)
    error: Mapped[bool] = mapped_column(Boolean, default=False)
    at: Mapped[float] = mapped_column(Float)
