"""Shared fixtures: an isolated dmipro home per test, and real PostgreSQL and Redis servers.

Tests that need a service skip when it is missing on a developer machine and fail in CI
(``CI=true``), where ``.ci/run`` installs and starts them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import dmipro.config
from dmipro.config import get_settings, reload_settings

pytest_plugins = ["tests.subscribers._support"]  # shared fixtures: quiet_otel, recorded_events

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
REPO = Path(__file__).resolve().parent.parent


def need(reason: str) -> None:
    """Skip locally, fail in CI: a missing service is a broken CI set-up, not a pass."""
    if IN_CI:
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def dmipro_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Every test gets its own DMIPRO_HOME (and so its own SQLite database)."""
    home = tmp_path / "dmipro-home"
    monkeypatch.setenv("DMIPRO_HOME", str(home))
    monkeypatch.delenv("DMIPRO_DATABASE_URL", raising=False)
    monkeypatch.delenv("DMIPRO_SUBSCRIBERS", raising=False)
    monkeypatch.setenv("DMIPRO_CONFIG", str(tmp_path / "no-dmipro.yaml"))
    monkeypatch.setenv("DMIPRO_ALLOWED_MODULES", "examples,tests")
    reload_settings()
    yield home
    dmipro.config._settings = None
    from dmipro.lm.ratelimit import reset

    reset()  # a test's 429s must not slow the next test's LM calls down


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def postgres_server_url() -> str:
    """URL of a PostgreSQL server to create test databases on (``DMIPRO_TEST_POSTGRES_URL``)."""
    url = os.environ.get("DMIPRO_TEST_POSTGRES_URL")
    if not url:
        need("PostgreSQL: set DMIPRO_TEST_POSTGRES_URL (see .ci/run)")
    return str(url)


@pytest.fixture
def postgres_url(postgres_server_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"dmipro_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres_server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(postgres_server_url).set(database=name).render_as_string(hide_password=False)
    yield url
    from dmipro import db

    for key in [k for k in db._engines if k == url]:
        db._engines.pop(key).dispose()
        db._upgraded.discard(key)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The configured database, on SQLite and on PostgreSQL (subprocesses inherit it through the env)."""
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
        monkeypatch.setenv("DMIPRO_DATABASE_URL", url)
        reload_settings()
    return get_settings().effective_database_url


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """A private redis-server on a free port for the whole session; yields its base URL.

    It requires a password, as every deployment should: the URL carries it
    (``redis://:PASSWORD@127.0.0.1:PORT``), so every client under test must pass it on.
    """
    url = os.environ.get("DMIPRO_TEST_REDIS_URL")
    if url:
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        need("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    password = uuid.uuid4().hex
    proc = subprocess.Popen(
        [str(binary), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--requirepass", password],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    yield f"redis://:{password}@127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def redis_url(redis_server: str) -> Iterator[str]:
    """A flushed Redis database for one test."""
    import redis

    url = f"{redis_server}/0"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()
