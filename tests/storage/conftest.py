"""Fixtures for the storage suite: one store per backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from dmipro.config import reload_settings
from dmipro.storage import DatabaseProgramStore, DirectoryProgramStore, ProgramStore


@pytest.fixture(params=["sqlite", "postgres", "directory"])
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ProgramStore:
    """A program store on each backend (the database ones on the configured database)."""
    if request.param == "directory":
        return DirectoryProgramStore(tmp_path / "programs-dir")
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
        monkeypatch.setenv("DMIPRO_DATABASE_URL", url)
        reload_settings()
    return DatabaseProgramStore()
