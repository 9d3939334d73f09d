"""Finding 9: job sizes have configurable caps, checked at validation and again on the worker."""

from __future__ import annotations

import pytest

from dmipro.config import reload_settings
from dmipro.errors import JobSpecError
from dmipro.jobs import JobStore, load_job
from dmipro.jobs.submit import JobHandle, submit
from tests.contract.workers import Stack
from tests.fixtures.jobs import records
from tests.integration.conftest import small_job

pytestmark = pytest.mark.integration


def test_f09_oversized_jobs_are_refused_with_the_cap_that_applies(celery_stack: Stack,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    huge_trials = small_job(num_trials=10**9)
    before = len(JobStore().list(limit=10_000))
    with pytest.raises(JobSpecError, match=r"optimizer\.num_trials: 1000000000 .*DMIPRO_MAX_TRIALS"):
        submit(huge_trials, executor="celery")
    with pytest.raises(JobSpecError, match=r"optimizer\.num_candidates: .*DMIPRO_MAX_CANDIDATES"):
        load_job(small_job(num_candidates=10**6))
    rows = records("train", 20) * 10_001  # 200,020 rows
    with pytest.raises(JobSpecError, match=r"trainset: 200020 examples .*DMIPRO_MAX_DATASET_ROWS"):
        load_job({**small_job(), "trainset": rows})
    monkeypatch.setenv("DMIPRO_MAX_PAYLOAD_BYTES", "200000")
    reload_settings()
    padded = [{**r, "note": "x" * 20_000} for r in records("train", 20)]
    with pytest.raises(JobSpecError, match=r"the job is \d+ bytes .*DMIPRO_MAX_PAYLOAD_BYTES"):
        load_job({**small_job(), "trainset": padded})
    monkeypatch.delenv("DMIPRO_MAX_PAYLOAD_BYTES")
    reload_settings()
    assert len(JobStore().list(limit=10_000)) == before  # nothing written

    # A row written straight into the job database (a tampered client): the worker's own caps refuse it
    # before it builds anything, and the worker lives on.
    spec = load_job(small_job()).to_json()
    spec["optimizer"]["num_candidates"] = 10**6
    record = JobStore().create(name="oversized", spec=spec, executor="celery")
    from dmipro.executor_adapters.celery import CeleryAdapter

    CeleryAdapter.enqueue_coordinator(record.id)
    report = JobHandle(record.id).wait(timeout=60)
    assert report["state"] == "failed" and "DMIPRO_MAX_CANDIDATES" in report["error"], report
    assert all(w.alive for w in celery_stack.workers["celery"])
