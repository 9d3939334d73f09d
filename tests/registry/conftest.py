"""Fixtures for the registry suite: the configured database on SQLite and on PostgreSQL."""

from __future__ import annotations

import pytest

from dmipro.config import get_settings, reload_settings


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The database URL the registry uses; subprocesses inherit it through the environment."""
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
        monkeypatch.setenv("DMIPRO_DATABASE_URL", url)
        reload_settings()
    return get_settings().effective_database_url
