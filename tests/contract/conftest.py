"""The executor contract, on every backend: inline, thread, celery and rq.

``executor`` is parametrized over the four backends. The remote ones run on real worker
processes against a real Redis and a PostgreSQL job database (the session's shared
stack, see ``workers.py``); the in-process ones use the test's own SQLite database.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import tests.contract.tasks  # noqa: F401  (registers contract.* in this process too)
import tests.fixtures.tasks  # noqa: F401
from dmipro.executor_adapters import ExecutorAdapter, make_executor
from tests.contract.workers import Stack, shared_stack_fixture

CONCURRENCY = 4
BACKENDS = [
    "inline",
    "thread",
    pytest.param("celery", marks=pytest.mark.integration),
    pytest.param("rq", marks=pytest.mark.integration),
]


@pytest.fixture(scope="session")
def remote_stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The shared Celery and RQ workers (started on first use, stopped at the end of the session)."""
    yield from shared_stack_fixture(request, tmp_path_factory)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """A backend name; for celery and rq, this process now points at the shared stack."""
    name: str = request.param
    if name in ("celery", "rq"):
        stack: Stack = request.getfixturevalue("remote_stack")
        stack.use(name, monkeypatch)
    return name


@pytest.fixture
def executor(backend: str) -> Iterator[ExecutorAdapter]:
    """An executor of ``backend`` with four slots."""
    ex = make_executor(backend, CONCURRENCY)
    yield ex
    ex.close()
