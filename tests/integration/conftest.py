"""Worker-process fixtures for the Celery, RQ, crash and Flower suites.

Everything here is real: a private redis-server, a PostgreSQL job database and worker
processes started with subprocess. ``remote_stack`` is the session's shared set of
workers (the contract suite uses the same one); ``crash_stack`` starts workers of its own
with a 5-second visibility timeout, so the crash tests can kill them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import tests.contract.tasks  # noqa: F401  (registers contract.* in this process too)
import tests.fixtures.tasks  # noqa: F401
from dmipro.config import reload_settings
from dmipro.jobs import JobStore
from dmipro.jobs.store import eval_cache_table
from tests.contract.workers import (
    Stack,
    WorkerProcess,
    backend_env,
    base_env,
    celery_worker,
    flush,
    shared_stack_fixture,
)
from tests.fixtures.jobs import math_job, records


@pytest.fixture(scope="session")
def remote_stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The shared Celery and RQ workers (started on first use, stopped at the end of the session)."""
    yield from shared_stack_fixture(request, tmp_path_factory)


@pytest.fixture
def celery_stack(remote_stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Stack:
    """The shared stack, with this process pointed at its Celery broker and job database."""
    remote_stack.use("celery", monkeypatch)
    return remote_stack


@pytest.fixture
def rq_stack(remote_stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Stack:
    """The shared stack, with this process pointed at its RQ Redis and job database."""
    remote_stack.use("rq", monkeypatch)
    return remote_stack


def small_job(*, latency_ms: float = 0.0, val: int = 20, **optimizer: Any) -> dict[str, Any]:
    """math_qa with explicit small counts (seed 9); ``latency_ms`` slows every LM call."""
    opt = {"auto": None, "num_candidates": 3, "num_trials": 4, "minibatch_size": 10, "seed": 9}
    opt.update(optimizer)
    sim = {"sim": {"latency_ms": latency_ms}} if latency_ms else {}
    return math_job(
        name="integration",
        trainset=records("train", 20),
        valset=records("dev", val),
        lm={"model": "sim/math", "temperature": 0.0, **sim},
        prompt_lm={"model": "sim/math", "temperature": 1.0, **sim},
        optimizer=opt,
        executor={"backend": "celery", "concurrency": 4},
    )


def scored(job_id: str, at_least: int) -> bool:
    """True once the search has cached ``at_least`` example scores (more evaluations are in flight)."""
    store = JobStore()
    record = store.get(job_id)
    if record.state.finished:
        pytest.fail(f"the job finished before the fault was injected: {record.state.value} {record.error}")
    with store.engine.connect() as conn:
        n = conn.execute(sa.select(sa.func.count()).where(eval_cache_table.c.job_id == job_id)).scalar_one()
    return record.phase == "search" and n >= at_least


CRASH_DB = 13
"""Redis databases of the crash stack: broker 13, results 14."""
VISIBILITY_TIMEOUT_S = 5


@dataclass
class CrashStack:
    """Celery workers that tests may kill: one per role, replaceable."""

    env: dict[str, str]
    logs: Path
    roles: dict[str, WorkerProcess] = field(default_factory=dict)
    retired: list[WorkerProcess] = field(default_factory=list)

    QUEUES = {"coordinator": "dmipro.coordinator", "work": "dmipro.work"}
    SLOTS = {"coordinator": 2, "work": 4}

    def start(self, *roles: str) -> None:
        """Start a fresh worker for each role (they start in parallel)."""
        started = []
        for role in roles:
            worker = celery_worker(
                self.env,
                self.logs,
                queues=self.QUEUES[role],
                concurrency=self.SLOTS[role],
                tag=f"crash-{role}",
            )
            self.roles[role] = worker.start()
            started.append(worker)
        for worker in started:
            worker.wait_ready()

    def kill(self, role: str) -> None:
        """SIGKILL the role's worker (it stays dead)."""
        worker = self.roles.pop(role)
        worker.kill()
        self.retired.append(worker)

    def ensure(self) -> None:
        self.start(*[role for role in self.QUEUES if role not in self.roles or not self.roles[role].alive])

    def logs_text(self) -> str:
        return "\n\n".join(f"--- {w.name}\n{w.log_tail(30)}" for w in [*self.retired, *self.roles.values()])

    def stop(self) -> None:
        for worker in self.roles.values():
            worker.stop()


@pytest.fixture(scope="module")
def crash_workers(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CrashStack]:
    """A coordinator worker and a work worker on their own Redis databases, visibility timeout 5 s."""
    from tests.contract.workers import create_database, drop_database

    redis_base = request.getfixturevalue("redis_server")
    server = request.getfixturevalue("postgres_server_url")
    url, name = create_database(server)
    home = tmp_path_factory.mktemp("crash-stack")
    flush(redis_base, CRASH_DB, CRASH_DB + 1)
    env = base_env(
        url,
        home,
        DMIPRO_VISIBILITY_TIMEOUT=str(VISIBILITY_TIMEOUT_S),
        **backend_env(redis_base, "celery", CRASH_DB),
    )
    logs = home / "logs"
    logs.mkdir()
    stack = CrashStack(env, logs)
    try:
        yield stack
    finally:
        stack.stop()
        drop_database(server, name)


@pytest.fixture
def crash_stack(crash_workers: CrashStack, monkeypatch: pytest.MonkeyPatch) -> CrashStack:
    """The crash workers, all roles alive, with this process pointed at them."""
    keys = ("DMIPRO_DATABASE_URL", "DMIPRO_BROKER_URL", "DMIPRO_RESULT_BACKEND", "DMIPRO_VISIBILITY_TIMEOUT")
    for key in keys:
        monkeypatch.setenv(key, crash_workers.env[key])
    reload_settings()
    crash_workers.ensure()
    return crash_workers
