"""Real worker processes for the remote suites: Celery and RQ workers started with subprocess.

A :class:`Stack` is a Redis (the session's private redis-server), a PostgreSQL job
database and the worker processes that use them. ``shared_stack`` starts one for the
whole session on first use and stops it when the last suite using it releases it, so
the contract and integration suites share the same workers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dmipro.config import reload_settings

REPO = Path(__file__).resolve().parents[2]
TASK_MODULES = "tests.fixtures.tasks,tests.contract.tasks"
"""Extra task bodies every test worker registers (see DMIPRO_TASK_MODULES)."""


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``cond`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


@dataclass
class WorkerProcess:
    """One worker process, its log file and the line that says it is ready."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    ready_marker: str
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.argv, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        return self

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout: float = 90) -> WorkerProcess:
        assert self.proc is not None

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"worker {self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            return self.ready_marker in self.log_path.read_text(errors="replace")

        wait_for(ready, timeout, f"worker {self.name} to be ready", interval=0.1)
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no shutdown, no acknowledgements, no cleanup (a crashed machine)."""
        if self.proc is not None and self.alive:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM (warm shutdown), then SIGKILL if it does not exit in time."""
        if self.proc is None or not self.alive:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()


def celery_worker(env: dict[str, str], log_dir: Path, *, queues: str, concurrency: int,
                  tag: str) -> WorkerProcess:
    """A Celery worker process (thread pool, task events on)."""
    name = f"{tag}-{uuid.uuid4().hex[:6]}@%h"
    argv = [sys.executable, "-m", "celery", "-A", "dmipro.workers.celery_app", "worker", "-P", "threads",
            "-c", str(concurrency), "-Q", queues, "-n", name, "-E", "--loglevel=INFO", "--without-mingle"]
    short = name.split("@")[0]
    return WorkerProcess(short, argv, env, log_dir / f"{short}.log", ready_marker=" ready.")


def rq_worker(env: dict[str, str], log_dir: Path, *, queues: str, tag: str) -> WorkerProcess:
    """An RQ worker process (``python -m dmipro.workers.rq_worker``)."""
    name = f"{tag}-{uuid.uuid4().hex[:6]}"
    argv = [sys.executable, "-m", "dmipro.workers.rq_worker", "--queues", queues, "--name", name]
    return WorkerProcess(name, argv, env, log_dir / f"{name}.log", ready_marker="Listening on")


def base_env(database_url: str, home: Path, **extra: str) -> dict[str, str]:
    """The environment of a worker process: this one's, with dmipro's settings for the stack."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DMIPRO_", "FLOWER_"))}
    env.update({
        "DMIPRO_DATABASE_URL": database_url,
        "DMIPRO_HOME": str(home),
        "DMIPRO_ALLOWED_MODULES": "examples,tests",
        "DMIPRO_CONFIG": str(home / "no-dmipro.yaml"),
        "DMIPRO_TASK_MODULES": TASK_MODULES,
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


def backend_env(redis_base: str, backend: str, db: int) -> dict[str, str]:
    """Broker (and result backend) settings for one backend on Redis database ``db`` (and ``db + 1``)."""
    if backend == "celery":
        return {"DMIPRO_BROKER_URL": f"{redis_base}/{db}", "DMIPRO_RESULT_BACKEND": f"{redis_base}/{db + 1}"}
    return {"DMIPRO_BROKER_URL": f"{redis_base}/{db}", "DMIPRO_RESULT_BACKEND": f"{redis_base}/{db}"}


def flush(redis_base: str, *dbs: int) -> None:
    import redis

    for db in dbs:
        client = redis.Redis.from_url(f"{redis_base}/{db}")
        client.flushdb()
        client.close()


@dataclass
class Stack:
    """Redis + a PostgreSQL job database + worker processes, and the settings to reach them."""

    redis_base: str
    database_url: str
    home: Path
    envs: dict[str, dict[str, str]] = field(default_factory=dict)
    workers: dict[str, list[WorkerProcess]] = field(default_factory=dict)

    def use(self, backend: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
        """Point this test process at the stack's database and ``backend``'s broker."""
        env = self.envs[backend]
        for key in ("DMIPRO_DATABASE_URL", "DMIPRO_BROKER_URL", "DMIPRO_RESULT_BACKEND"):
            monkeypatch.setenv(key, env[key])
        reload_settings()
        return env

    def logs(self) -> str:
        return "\n\n".join(f"--- {w.name}\n{w.log_tail(25)}" for ws in self.workers.values() for w in ws)

    def stop(self) -> None:
        for ws in self.workers.values():
            for w in ws:
                if w.proc is not None and w.alive:
                    w.proc.terminate()
        for ws in self.workers.values():
            for w in ws:
                w.stop()


CELERY_DBS = 10
"""Redis databases of the shared stack: Celery broker 10 and results 11, RQ 12."""
RQ_DB = 12


def start_shared_stack(redis_base: str, database_url: str, home: Path) -> Stack:
    """One Celery worker (both queues, 8 threads) and three RQ workers (one coordinator, two work)."""
    flush(redis_base, CELERY_DBS, CELERY_DBS + 1, RQ_DB)
    stack = Stack(redis_base, database_url, home)
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stack.envs["celery"] = base_env(database_url, home, **backend_env(redis_base, "celery", CELERY_DBS))
    stack.envs["rq"] = base_env(database_url, home, **backend_env(redis_base, "rq", RQ_DB))
    stack.workers["celery"] = [
        celery_worker(stack.envs["celery"], logs, queues="dmipro.coordinator,dmipro.work", concurrency=8,
                      tag="shared").start(),
    ]
    stack.workers["rq"] = [
        rq_worker(stack.envs["rq"], logs, queues="dmipro.coordinator", tag="rq-coordinator").start(),
        rq_worker(stack.envs["rq"], logs, queues="dmipro.work", tag="rq-work-a").start(),
        rq_worker(stack.envs["rq"], logs, queues="dmipro.work", tag="rq-work-b").start(),
    ]
    try:
        for ws in stack.workers.values():
            for w in ws:
                w.wait_ready()
    except BaseException:
        stack.stop()
        raise
    return stack


class _Shared:
    """The session's shared stack, started on first acquire and stopped on the last release."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0
        self.stack: Stack | None = None
        self.database: tuple[str, str] | None = None

    def acquire(self, redis_base: str, postgres_server_url: str, home: Path) -> Stack:
        with self.lock:
            if self.stack is None:
                url, name = create_database(postgres_server_url)
                self.database = (postgres_server_url, name)
                try:
                    self.stack = start_shared_stack(redis_base, url, home)
                except BaseException:
                    drop_database(postgres_server_url, name)
                    self.database = None
                    raise
            self.users += 1
            return self.stack

    def release(self) -> None:
        with self.lock:
            self.users -= 1
            if self.users > 0 or self.stack is None:
                return
            self.stack.stop()
            self.stack = None
            if self.database is not None:
                drop_database(*self.database)
                self.database = None


SHARED = _Shared()


def create_database(server_url: str) -> tuple[str, str]:
    """A fresh PostgreSQL database on ``server_url``: (its URL, its name)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"dmipro_workers_{uuid.uuid4().hex[:10]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(server_url).set(database=name).render_as_string(hide_password=False), name


def drop_database(server_url: str, name: str) -> None:
    from sqlalchemy import create_engine, text

    from dmipro import db

    for key in [k for k in db._engines if name in k]:
        db._engines.pop(key).dispose()
        db._upgraded.discard(key)
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def shared_stack_fixture(request: pytest.FixtureRequest,
                         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Body of the session fixture ``remote_stack`` (defined in each suite's conftest)."""
    redis_base = request.getfixturevalue("redis_server")
    postgres_server_url = request.getfixturevalue("postgres_server_url")
    home = tmp_path_factory.mktemp("remote-stack")
    stack = SHARED.acquire(redis_base, postgres_server_url, home)
    try:
        yield stack
    finally:
        SHARED.release()
