"""Per-process job runtimes: bounded for long-lived workers, in-process ones kept."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import dmipro.jobs.runtime as runtime_module
from dmipro.jobs import JobSpec, forget_runtime, get_runtime, load_job, register_runtime
from tests.teleprompt.conftest import small_spec

ROOT = Path(__file__).resolve().parents[2]


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


def test_a_process_freezes_its_loaded_heap_once_and_still_collects_what_jobs_leave() -> None:
    # A fresh interpreter: the test session has built runtimes already.
    script = """
import gc, json, weakref
from dmipro.jobs import load_job, register_runtime
from dmipro._heap import freeze_loaded
from tests.teleprompt.conftest import small_spec

before = gc.get_freeze_count()
register_runtime("heap", load_job(small_spec(train=4, val=4)).spec)
frozen = gc.get_freeze_count()

class Node:
    pass

a, b = Node(), Node()
a.other, b.other = b, a
gone = weakref.ref(a)
del a, b
gc.collect()
print(json.dumps({"before": before, "frozen": frozen, "again": freeze_loaded(), "collected": gone() is None}))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT, timeout=120
    )
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["before"] == 0
    assert seen["frozen"] > 100_000  # DSPy, optuna and their dependencies
    assert seen["again"] is False
    assert seen["collected"] is True
