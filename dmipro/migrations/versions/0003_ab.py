"""A/B experiments and their recorded outcomes.

Revision ID: 0003_ab
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_ab"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dmipro_ab_experiments",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("program", sa.String(128), nullable=False),
        sa.Column("control_version", sa.Integer, nullable=False),
        sa.Column("treatment_version", sa.Integer, nullable=False),
        sa.Column("split", sa.Float, nullable=False),
        sa.Column("metric", sa.String(64), nullable=False),
        sa.Column("alpha", sa.Float, nullable=False),
        sa.Column("salt", sa.String(64), nullable=False),
        sa.Column("settings", sa.JSON, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("decision", sa.String(16), nullable=True),
        sa.Column("promoted_version", sa.Integer, nullable=True),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("stopped_at", sa.Float, nullable=True),
    )
    op.create_table(
        "dmipro_ab_outcomes",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("experiment", sa.String(128), nullable=True),
        sa.Column("arm", sa.String(16), nullable=False),
        sa.Column("program", sa.String(128), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("unit_id", sa.String(256), nullable=False),
        sa.Column("value", sa.Float, nullable=False),
        sa.Column("latency_ms", sa.Float, nullable=True),
        sa.Column("tokens", sa.Integer, nullable=True),
        sa.Column("cost_usd", sa.Float, nullable=True),
        sa.Column("error", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("at", sa.Float, nullable=False),
    )
    op.create_index("ix_dmipro_ab_outcomes_experiment", "dmipro_ab_outcomes", ["experiment", "id"])
    op.create_index("ix_dmipro_ab_outcomes_program", "dmipro_ab_outcomes", ["program", "version", "id"])


def downgrade() -> None:
    op.drop_index("ix_dmipro_ab_outcomes_program", table_name="dmipro_ab_outcomes")
    op.drop_index("ix_dmipro_ab_outcomes_experiment", table_name="dmipro_ab_outcomes")
    op.drop_table("dmipro_ab_outcomes")
    op.drop_table("dmipro_ab_experiments")
