"""The job database: one SQLAlchemy engine per URL, schema managed by Alembic.

SQLite (the embedded default) runs in WAL mode with a busy timeout so a coordinator,
its worker threads and a CLI reading status can share the file. PostgreSQL is the
choice when workers run on other machines. Optuna keeps its study tables in the same
database; our Alembic history uses its own version table (``dmipro_alembic_version``)
so the two never collide.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from dmipro.config import get_settings, mask_passwords
from dmipro.errors import ConfigError

__all__ = [
    "RECONNECT_S",
    "VERSION_TABLE",
    "Base",
    "database_gone",
    "dispose_engine",
    "get_engine",
    "is_sqlite",
    "patient_connects",
    "session_scope",
    "upgrade",
]

log = logging.getLogger(__name__)

RECONNECT_S = 60.0
"""How long a connection to a server that was up once keeps trying while it restarts."""

VERSION_TABLE = "dmipro_alembic_version"


class Base(DeclarativeBase):
    """Declarative base of every dmipro table."""


_lock = threading.Lock()
_engines: dict[str, Engine] = {}
_upgraded: set[str] = set()


def _forget_parent_connections() -> None:
    """In a forked child: never use a pooled connection of the parent.

    A Celery prefork worker forks a new child after a time limit or a revoke; its main
    process holds a reconciler thread that reads the job database. Sharing one socket
    between two processes corrupts both sessions (a connection found mid-transaction at
    checkout). Each engine starts a fresh pool here, leaving the parent's connections open
    for the parent (SQLAlchemy's ``dispose(close=False)`` recipe for ``os.fork``).
    """
    global _lock
    _lock = threading.Lock()  # a thread of the parent may have held it at the fork
    for engine in _engines.values():
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_forget_parent_connections)


def is_sqlite(url: str) -> bool:
    """True for a SQLite URL."""
    return make_url(url).get_backend_name() == "sqlite"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _new_engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except Exception as exc:
        message = f"DMIPRO_DATABASE_URL {url!r} is not a database URL ({exc})"
        raise ConfigError(mask_passwords(message)) from None
    kwargs: dict[str, Any] = {"future": True}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
    else:
        kwargs["pool_pre_ping"] = True
    try:
        engine = create_engine(url, **kwargs)
    except Exception as exc:  # a missing driver, a malformed URL
        raise ConfigError(mask_passwords(
            f"cannot open database {parsed.render_as_string(hide_password=True)}: {exc}"
        )) from None
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        patient_connects(engine)
    return engine


def patient_connects(engine: Engine, wait_s: float = RECONNECT_S) -> Engine:
    """Let ``engine`` wait up to ``wait_s`` for a server that restarts, once it has reached it.

    A first connection still fails at once (a wrong URL gets its error without delay);
    after that, a refused connection (the server restarting, or in recovery) is retried
    with backoff. Stale pooled connections are caught by ``pool_pre_ping``.
    """
    seen_up = threading.Event()

    def connect(dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
        deadline = time.monotonic() + wait_s
        delay = 0.1
        while True:
            try:
                conn = dialect.connect(*cargs, **cparams)
            except dialect.loaded_dbapi.OperationalError as exc:
                if not seen_up.is_set() or time.monotonic() + delay > deadline:
                    raise
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                log.warning("the database is unreachable (%s); retrying in %.1fs", reason, delay)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            seen_up.set()
            return conn

    event.listen(engine, "do_connect", connect)
    return engine


def database_gone(exc: BaseException) -> bool:
    """True when ``exc`` (or what caused it) is a lost or refused database connection.

    Such a failure says nothing about the job: a coordinator may resume it once the
    database is back.
    """
    from sqlalchemy.exc import DBAPIError, OperationalError

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DBAPIError) and current.connection_invalidated:
            return True
        if isinstance(current, OperationalError):
            return True
        current = current.__cause__ or current.__context__
    return False


def get_engine(url: str | None = None) -> Engine:
    """The engine for ``url`` (default: the settings' database), schema upgraded on first use."""
    url = url or get_settings().effective_database_url
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = _new_engine(url)
        if url not in _upgraded:
            try:
                upgrade(engine)
            except OperationalError as exc:  # unreachable, wrong password, no such database
                where = engine.url.render_as_string(hide_password=True)
                reason = " ".join(str(exc.orig or exc).split())
                raise ConfigError(mask_passwords(f"cannot reach the job database {where}: {reason}; "
                                                 "check DMIPRO_DATABASE_URL")) from None
            _upgraded.add(url)
    return engine


def dispose_engine(url: str) -> None:
    """Close and forget the engine for ``url`` (a temporary database about to be deleted)."""
    with _lock:
        engine = _engines.pop(url, None)
        _upgraded.discard(url)
    if engine is not None:
        engine.dispose()


def upgrade(engine: Engine) -> None:
    """Run the Alembic migrations up to head on ``engine``.

    Safe when several processes start on a fresh database at once: SQLite files are
    upgraded under a file lock, PostgreSQL under an advisory lock (see migrations/env.py).
    """
    from alembic import command
    from alembic.config import Config
    from filelock import FileLock

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.attributes["connection_engine"] = engine
    database = engine.url.database
    if engine.url.get_backend_name() == "sqlite" and database and database != ":memory:":
        with FileLock(database + ".migrate.lock", timeout=120):
            command.upgrade(cfg, "head")
    else:
        command.upgrade(cfg, "head")


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    factory = sessionmaker(bind=get_engine(url), expire_on_commit=False)
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
