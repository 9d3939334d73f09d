"""The job database: migrations applied once, SQLite settings, and several processes starting at once."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.config import Config
from alembic.script import ScriptDirectory

import dmipro.db
from dmipro.db import VERSION_TABLE, get_engine, is_sqlite, session_scope, upgrade
from dmipro.errors import ConfigError
from dmipro.jobs.store import JobStore
from tests.fixtures.processes import open_database_and_write

TABLES = {"dmipro_jobs", "dmipro_checkpoints", "dmipro_eval_cache"}


def _head() -> str:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(dmipro.db.__file__).parent / "migrations"))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert head is not None
    return head


def _versions(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars())


def test_default_engine_is_the_sqlite_file_under_home(dmipro_home: Path) -> None:
    engine = get_engine()
    assert engine.url.database == str((dmipro_home / "dmipro.db").resolve())
    assert (dmipro_home / "dmipro.db").is_file()
    assert TABLES <= set(sa.inspect(engine).get_table_names())
    assert _versions(engine) == [_head()]


def test_migrations_run_once_per_process_and_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'once.db'}"
    engine = get_engine(url)
    statements: list[str] = []
    sa.event.listen(engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    assert get_engine(url) is engine
    assert statements == [], "a second get_engine must not touch the schema again"
    assert _versions(engine) == [_head()]


def test_upgrading_again_keeps_data_and_version(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'again.db'}"
    record = JobStore(url).create(name="kept", spec={}, executor="inline")
    upgrade(get_engine(url))
    assert _versions(get_engine(url)) == [_head()]
    assert JobStore(url).get(record.id).name == "kept"
    # A new process opening the existing file sees the same job and the same single version row.
    code = (
        "import sqlalchemy as sa\n"
        "from dmipro.db import VERSION_TABLE, get_engine\n"
        "from dmipro.jobs.store import JobStore\n"
        f"url = {url!r}\n"
        f"print(JobStore(url).get({record.id!r}).name)\n"
        "with get_engine(url).connect() as c:\n"
        "    print(c.execute(sa.text(f'SELECT count(*) FROM {VERSION_TABLE}')).scalar())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["kept", "1"]


def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path: Path) -> None:
    engine = get_engine(f"sqlite:///{tmp_path / 'wal.db'}")
    with engine.connect() as conn:
        assert conn.execute(sa.text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(sa.text("PRAGMA foreign_keys")).scalar() == 1
        assert conn.execute(sa.text("PRAGMA busy_timeout")).scalar() >= 1000


def test_missing_parent_directories_are_created(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "jobs.db"
    get_engine(f"sqlite:///{path}")
    assert path.is_file()


@pytest.mark.slow
def test_several_processes_can_open_a_fresh_database_at_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(4), ctx.Queue()
    procs = [
        ctx.Process(target=open_database_and_write, args=(url, start, results, f"p{i}")) for i in range(4)
    ]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    failures = [detail for _, status, detail in outcomes if status != "ok"]
    assert not failures, failures[0]
    assert all(p.exitcode == 0 for p in procs)
    engine = get_engine(url)
    assert _versions(engine) == [_head()]
    assert sorted(r.name for r in JobStore(url).list()) == ["p0", "p1", "p2", "p3"]


def test_session_scope_commits_or_rolls_back(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    store = JobStore(url)
    record = store.create(name="s", spec={}, executor="inline")
    jobs = sa.table("dmipro_jobs", sa.column("id"), sa.column("name"))
    with pytest.raises(RuntimeError), session_scope(url) as session:
        session.execute(sa.update(jobs).where(jobs.c.id == record.id).values(name="changed"))
        raise RuntimeError("abort")
    assert store.get(record.id).name == "s"
    with session_scope(url) as session:
        session.execute(sa.update(jobs).where(jobs.c.id == record.id).values(name="changed"))
    assert store.get(record.id).name == "changed"


def test_is_sqlite() -> None:
    assert is_sqlite("sqlite:///x.db") and is_sqlite("sqlite://")
    assert not is_sqlite("postgresql+psycopg://u@h/db")


def test_a_bad_database_url_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="not a database URL"):
        get_engine("not a url")
    with pytest.raises(ConfigError, match="cannot open database"):
        get_engine("nosuchdialect://host/db")


def test_a_lost_database_is_told_apart_from_a_failing_job(postgres_url: str) -> None:
    """A refused connection (also as Optuna wraps it) is 'database gone'; a job's own error is not."""
    from optuna.exceptions import StorageInternalError
    from sqlalchemy.engine import make_url

    from dmipro.db import database_gone

    closed = make_url(postgres_url).set(port=1).render_as_string(hide_password=False)
    engine = sa.create_engine(closed)
    with pytest.raises(sa.exc.OperationalError) as info:
        engine.connect()
    assert database_gone(info.value)
    try:
        raise StorageInternalError("commit failed") from info.value
    except StorageInternalError as wrapped:
        assert database_gone(wrapped)
    assert not database_gone(ValueError("metric exploded"))
    assert not database_gone(ConfigError("bad setting"))


def test_a_first_connection_to_a_wrong_server_fails_at_once(postgres_url: str) -> None:
    """patient_connects retries only a server it has reached before (the PostgreSQL restart in
    tests/integration/test_chaos.py shows the waiting): a wrong URL still fails fast."""
    import time

    from sqlalchemy.engine import make_url

    from dmipro.db import patient_connects

    closed = make_url(postgres_url).set(port=1).render_as_string(hide_password=False)
    engine = patient_connects(sa.create_engine(closed), wait_s=30)
    start = time.monotonic()
    with pytest.raises(sa.exc.OperationalError):
        engine.connect()
    assert time.monotonic() - start < 5


def _backend_pid(url: str, out: multiprocessing.queues.Queue) -> None:  # type: ignore[type-arg]
    with get_engine(url).connect() as conn:
        out.put(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())


def test_a_forked_child_never_uses_its_parents_connection(postgres_url: str) -> None:
    # A Celery prefork worker forks children while its main process (the reconciler) holds
    # pooled connections; a shared socket corrupts both sessions.
    engine = get_engine(postgres_url)
    with engine.connect() as conn:
        parent_pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
    # The parent's connection waits in its pool.
    assert isinstance(engine.pool, sa.QueuePool) and engine.pool.checkedin() == 1
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_backend_pid, args=(postgres_url, out))
    child.start()
    child_pid = out.get(timeout=30)
    child.join(30)
    assert child.exitcode == 0
    assert child_pid != parent_pid
    with engine.connect() as conn:  # and the parent's own session is intact
        assert conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one() == parent_pid
