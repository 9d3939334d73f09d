"""An app that runs optimizations one after another keeps no database connection per run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dmipro.api import optimize
from tests.fixtures.jobs import math_job


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open descriptors through /proc")
def test_repeated_optimizations_do_not_leak_file_descriptors() -> None:
    job = math_job(n=20, optimizer={"auto": None, "num_candidates": 3, "num_trials": 4, "minibatch_size": 10,
                                    "seed": 1}, executor={"backend": "thread", "concurrency": 8})
    optimize(job)  # the first run opens what a process keeps: the job store's pool, DSPy's cache
    opened = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        optimize(job)
    # Each run's Optuna storage kept its SQLite connections open before (+2 descriptors a run).
    assert len(os.listdir("/proc/self/fd")) <= opened
