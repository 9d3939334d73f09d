"""Jobs, phase checkpoints and the per-example evaluation cache.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dmipro_jobs",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("phase", sa.String(40), nullable=True),
        sa.Column("executor", sa.String(20), nullable=False),
        sa.Column("spec", sa.JSON, nullable=False),
        sa.Column("progress", sa.JSON, nullable=False),
        sa.Column("result", sa.JSON, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("started_at", sa.Float, nullable=True),
        sa.Column("finished_at", sa.Float, nullable=True),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_index("ix_dmipro_jobs_name", "dmipro_jobs", ["name"])
    op.create_table(
        "dmipro_checkpoints",
        sa.Column(
            "job_id", sa.String(64), sa.ForeignKey("dmipro_jobs.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("phase", sa.String(40), primary_key=True),
        sa.Column("data", sa.JSON, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "dmipro_eval_cache",
        sa.Column(
            "job_id", sa.String(64), sa.ForeignKey("dmipro_jobs.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("fingerprint", sa.String(64), primary_key=True),
        sa.Column("example_id", sa.String(64), primary_key=True),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("dmipro_eval_cache")
    op.drop_table("dmipro_checkpoints")
    op.drop_index("ix_dmipro_jobs_name", table_name="dmipro_jobs")
    op.drop_table("dmipro_jobs")
