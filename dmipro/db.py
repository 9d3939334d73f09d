"""The job database: one SQLAlchemy engine per URL, schema managed by Alembic.

SQLite (the embedded default) runs in WAL mode with a busy timeout so a coordinator,
its worker threads and a CLI reading status can share the file. PostgreSQL is the
choice when workers run on other machines. Optuna keeps its study tables in the same
database; our Alembic history uses its own version table (``dmipro_alembic_version``)
so the two never collide.
"""

from __future__ import annotations

import threading
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

__all__ = ["VERSION_TABLE", "Base", "get_engine", "is_sqlite", "session_scope", "upgrade"]

VERSION_TABLE = "dmipro_alembic_version"


class Base(DeclarativeBase):
    """Declarative base of every dmipro table."""


_lock = threading.Lock()
_engines: dict[str, Engine] = {}
_upgraded: set[str] = set()


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
    return engine


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
