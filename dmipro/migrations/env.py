"""Alembic environment: runs on the engine dmipro hands over, with dmipro's version table."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from dmipro.db import VERSION_TABLE

_PG_LOCK_KEY = 0x646D6970  # "dmip": serialises concurrent upgrades of one PostgreSQL database

engine = context.config.attributes["connection_engine"]
with engine.begin() as connection:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
    context.configure(connection=connection, version_table=VERSION_TABLE, render_as_batch=True)
    context.run_migrations()
