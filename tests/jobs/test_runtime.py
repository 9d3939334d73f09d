"""Per-process job runtimes: bounded for long-lived workers, in-process ones kept."""

from __future__ import annotations

import pytest

import dmipro.jobs.runtime as runtime_module
from dmipro.jobs import JobSpec, forget_runtime, get_runtime, load_job, register_runtime
from tests.teleprompt.conftest import small_spec


def test_the_cache_is_bounded_and_keeps_in_process_runtimes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime_module, "MAX_RUNTIMES", 3)
    spec: JobSpec = load_job(small_spec(train=4, val=4)).spec
    from examples.math_qa.program import build, exact_match

    pinned = register_runtime("in-process", spec, program=build(), metric=exact_match)
    try:
        for i in range(5):
            register_runtime(f"db-{i}", spec)
        get_runtime("db-3")  # used recently: stays
        register_runtime("db-5", spec)
        kept = set(runtime_module._runtimes)
        assert kept == {"in-process", "db-3", "db-5"}
        assert get_runtime("in-process") is pinned
    finally:
        for key in list(runtime_module._runtimes):
            forget_runtime(key)
