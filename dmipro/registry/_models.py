"""Registry tables (created by migration 0002)."""

from __future__ import annotations

from sqlalchemy import Float, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from dmipro.db import Base

__all__ = ["DeploymentRow", "NameRow", "VersionRow"]


class NameRow(Base):
    """One registered name: its newest version and the deployed one. Writers lock this row."""

    __tablename__ = "dmipro_registry_names"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    latest_version: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    deployed_version: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class VersionRow(Base):
    """An immutable numbered version of a name, pointing at its stored program."""

    __tablename__ = "dmipro_registry_versions"

    name: Mapped[str] = mapped_column(
        String(128), ForeignKey("dmipro_registry_names.name", ondelete="CASCADE"), primary_key=True
    )
    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    program_id: Mapped[str] = mapped_column(String(32), ForeignKey("dmipro_programs.id"))
    best_score: Mapped[float | None] = mapped_column(Float)
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[float] = mapped_column(Float)


class DeploymentRow(Base):
    """One change of the deployed version: ``deploy`` or ``rollback``, from and to, who and when."""

    __tablename__ = "dmipro_registry_deployments"
    __table_args__ = (Index("ix_dmipro_registry_deployments_name", "name", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(
        String(128), ForeignKey("dmipro_registry_names.name", ondelete="CASCADE")
    )
    action: Mapped[str] = mapped_column(String(20))
    from_version: Mapped[int | None] = mapped_column(Integer)
    to_version: Mapped[int | None] = mapped_column(Integer)
    actor: Mapped[str] = mapped_column(String(200))
    at: Mapped[float] = mapped_column(Float)
