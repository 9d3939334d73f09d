"""Stored programs and the signature registry.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dmipro_programs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("job_id", sa.String(64), nullable=True),
        sa.Column("program_ref", sa.String(300), nullable=False),
        sa.Column("best_score", sa.Float, nullable=True),
        sa.Column("program", sa.Text, nullable=False),
        sa.Column("meta", sa.JSON, nullable=False),
        sa.Column("history", sa.JSON, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index("ix_dmipro_programs_job_id", "dmipro_programs", ["job_id"])
    op.create_table(
        "dmipro_registry_names",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("latest_version", sa.Integer, nullable=False, server_default="0"),
        sa.Column("deployed_version", sa.Integer, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "dmipro_registry_versions",
        sa.Column(
            "name",
            sa.String(128),
            sa.ForeignKey("dmipro_registry_names.name", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("program_id", sa.String(32), sa.ForeignKey("dmipro_programs.id"), nullable=False),
        sa.Column("best_score", sa.Float, nullable=True),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "dmipro_registry_deployments",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "name",
            sa.String(128),
            sa.ForeignKey("dmipro_registry_names.name", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("action", sa.String(20), nullable=False),
        sa.Column("from_version", sa.Integer, nullable=True),
        sa.Column("to_version", sa.Integer, nullable=True),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("at", sa.Float, nullable=False),
    )
    op.create_index("ix_dmipro_registry_deployments_name", "dmipro_registry_deployments", ["name", "id"])


def downgrade() -> None:
    op.drop_index("ix_dmipro_registry_deployments_name", table_name="dmipro_registry_deployments")
    op.drop_table("dmipro_registry_deployments")
    op.drop_table("dmipro_registry_versions")
    op.drop_table("dmipro_registry_names")
    op.drop_index("ix_dmipro_programs_job_id", table_name="dmipro_programs")
    op.drop_table("dmipro_programs")
