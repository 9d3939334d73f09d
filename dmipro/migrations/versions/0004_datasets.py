"""Datasets stored once, by the SHA-256 of their content, instead of inline in every job row.

Revision ID: 0004_datasets
Revises: 0003_ab
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_datasets"
down_revision = "0003_ab"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dmipro_datasets",
        sa.Column("digest", sa.String(64), primary_key=True),
        sa.Column("records", sa.JSON, nullable=False),
        sa.Column("rows", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("dmipro_datasets")
