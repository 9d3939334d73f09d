"""The job store: job rows through their life, checkpoints, the evaluation cache, missing jobs."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from dmipro.errors import JobNotFoundError, JobSpecError
from dmipro.jobs import JobState, JobStore, new_job_id
from dmipro.jobs.store import DATASET_REF, datasets_table

SPEC = {"name": "math_qa", "program": "examples.math_qa.program:build", "trainset": [{"question": "q"}]}


@pytest.fixture
def store() -> JobStore:
    return JobStore()


def test_create_and_get(store: JobStore) -> None:
    record = store.create(name="math_qa", spec=SPEC, executor="thread")
    assert record.id.startswith("math_qa-") and len(record.id) == len("math_qa-") + 12
    assert record.state is JobState.QUEUED and not record.state.finished
    assert store.job_spec(record.id) == SPEC and record.progress == {} and record.result is None
    assert record.attempts == 0 and not record.cancel_requested
    assert record.started_at is None and record.finished_at is None
    assert store.get(record.id) == record
    json.dumps(record.to_json(with_spec=True))
    assert "spec" not in record.to_json() and record.to_json()["state"] == "queued"


def test_job_ids_are_unique_and_an_explicit_id_is_kept(store: JobStore) -> None:
    assert len({new_job_id("x") for _ in range(100)}) == 100
    assert store.create(name="x", spec={}, executor="inline", job_id="chosen").id == "chosen"
    with pytest.raises(sa.exc.IntegrityError):
        store.create(name="x", spec={}, executor="inline", job_id="chosen")


def test_list_is_newest_first_and_limited(store: JobStore) -> None:
    ids = [store.create(name=f"j{i}", spec={}, executor="inline").id for i in range(3)]
    assert [r.id for r in store.list()] == ids[::-1]
    assert [r.id for r in store.list(limit=2)] == ids[:0:-1]


def test_start_progress_and_finish(store: JobStore) -> None:
    job = store.create(name="run", spec=SPEC, executor="inline").id
    started = store.start(job, "thread")
    assert started.state is JobState.RUNNING and started.executor == "thread" and started.attempts == 1
    assert started.started_at is not None

    store.set_progress(job, "bootstrap", done=1, total=4)
    store.set_progress(job, done=3)
    store.set_progress(job, "search", trial=1)
    record = store.get(job)
    assert record.phase == "search"
    assert record.progress == {"done": 3, "total": 4, "trial": 1}
    assert record.updated_at >= started.updated_at

    store.finish(job, JobState.SUCCEEDED, result={"best_score": 71.5})
    done = store.get(job)
    assert done.state is JobState.SUCCEEDED and done.state.finished
    assert done.result == {"best_score": 71.5} and done.error is None
    assert done.finished_at is not None and done.finished_at >= done.started_at  # type: ignore[operator]


def test_a_restarted_job_counts_attempts_and_keeps_its_first_start(store: JobStore) -> None:
    job = store.create(name="retry", spec={}, executor="celery").id
    first = store.start(job, "celery")
    store.finish(job, JobState.FAILED, error="worker lost")
    second = store.start(job, "celery")
    assert second.attempts == 2 and second.started_at == first.started_at
    assert second.state is JobState.RUNNING and second.error is None and second.finished_at is None


def test_update_accepts_states_and_fields(store: JobStore) -> None:
    job = store.create(name="u", spec={}, executor="inline").id
    store.update(job, state=JobState.RUNNING, phase="propose")
    record = store.get(job)
    assert (record.state, record.phase) == (JobState.RUNNING, "propose")


def test_cancelling_a_queued_job_finishes_it(store: JobStore) -> None:
    job = store.create(name="c", spec={}, executor="celery").id
    record = store.request_cancel(job)
    assert record.state is JobState.CANCELLED and record.cancel_requested
    assert record.finished_at is not None and record.error
    assert store.cancel_requested(job)


def test_cancelling_a_running_job_asks_the_coordinator_to_stop(store: JobStore) -> None:
    job = store.create(name="c", spec={}, executor="celery").id
    store.start(job, "celery")
    assert not store.cancel_requested(job)
    record = store.request_cancel(job)
    assert record.state is JobState.RUNNING and record.cancel_requested
    assert store.cancel_requested(job)


def test_cancelling_a_finished_job_changes_nothing(store: JobStore) -> None:
    job = store.create(name="c", spec={}, executor="inline").id
    store.start(job, "inline")
    store.finish(job, JobState.SUCCEEDED, result={"ok": True})
    before = store.get(job)
    after = store.request_cancel(job)
    assert after == before


def test_checkpoints_are_saved_and_replaced(store: JobStore) -> None:
    job = store.create(name="ck", spec={}, executor="inline").id
    assert store.load_checkpoint(job, "bootstrap") is None
    store.save_checkpoint(job, "bootstrap", {"demo_sets": [[1, 2]]})
    store.save_checkpoint(job, "propose", {"instructions": ["a"]})
    store.save_checkpoint(job, "bootstrap", {"demo_sets": [[3]]})
    assert store.load_checkpoint(job, "bootstrap") == {"demo_sets": [[3]]}
    assert store.load_checkpoint(job, "propose") == {"instructions": ["a"]}
    with store.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT count(*) FROM dmipro_checkpoints WHERE job_id = :j"), {"j": job})
        assert rows.scalar() == 2


def test_eval_cache_put_is_idempotent(store: JobStore) -> None:
    job = store.create(name="cache", spec={}, executor="inline").id
    assert store.cached_scores(job, "fp") == {}
    store.put_scores(job, "fp", [("0", 1.0, None), ("1", 0.0, "ValueError: x")])
    store.put_scores(job, "fp", [("0", 1.0, None)])  # the same row twice
    store.put_scores(job, "fp", [("1", 1.0, None), ("2", 0.5, None)])  # a row already there is kept
    store.put_scores(job, "fp", [])
    assert store.cached_scores(job, "fp") == {"0": (1.0, None), "1": (0.0, "ValueError: x"), "2": (0.5, None)}
    assert store.cached_scores(job, "other-fp") == {}
    other_job = store.create(name="cache", spec={}, executor="inline").id
    assert store.cached_scores(other_job, "fp") == {}


def test_state_is_shared_by_stores_on_the_same_database() -> None:
    writer, reader = JobStore(), JobStore()
    job = writer.create(name="shared", spec={}, executor="inline").id
    writer.set_progress(job, "search", trial=7)
    assert reader.get(job).progress == {"trial": 7}


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.get("nope"),
        lambda s: s.update("nope", phase="x"),
        lambda s: s.start("nope", "thread"),
        lambda s: s.set_progress("nope", done=1),
        lambda s: s.finish("nope", JobState.FAILED),
        lambda s: s.request_cancel("nope"),
    ],
    ids=["get", "update", "start", "set_progress", "finish", "request_cancel"],
)
def test_unknown_jobs_raise_job_not_found(store: JobStore, call: object) -> None:
    with pytest.raises(JobNotFoundError, match="'nope'"):
        call(store)  # type: ignore[operator]
    assert store.find("nope") is None


def test_a_dataset_is_stored_once_by_digest_and_the_row_names_it(store: JobStore) -> None:
    records = [{"question": f"q{i}", "answer": str(i)} for i in range(50)]
    spec = {**SPEC, "trainset": records, "valset": records[:10]}
    a = store.create(name="math_qa", spec=spec, executor="thread")
    b = store.create(name="math_qa", spec=spec, executor="thread")
    # The rows hold references, not the data; both jobs name the same stored dataset.
    assert a.spec["trainset"] == b.spec["trainset"]
    assert a.spec["trainset"].startswith(DATASET_REF) and len(a.spec["trainset"]) == len(DATASET_REF) + 64
    assert "q49" not in json.dumps(a.to_json(with_spec=True))
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(datasets_table.c.digest, datasets_table.c.rows)).all()
    assert sorted(n for _, n in rows) == [10, 50]
    assert store.job_spec(a.id) == store.job_spec(b.id) == spec


def test_a_job_naming_a_missing_dataset_says_so(store: JobStore) -> None:
    record = store.create(name="x", spec={"name": "x", "trainset": DATASET_REF + "0" * 64}, executor="inline")
    with pytest.raises(JobSpecError, match="not in the job database"):
        store.job_spec(record.id)


def test_datasets_are_stored_once_on_postgresql_too(postgres_url: str) -> None:
    store = JobStore(postgres_url)
    spec = {**SPEC, "trainset": [{"question": "q", "answer": "a"}] * 3}
    ids = [store.create(name="math_qa", spec=spec, executor="celery").id for _ in range(2)]
    assert [store.job_spec(i) for i in ids] == [spec, spec]
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(datasets_table)).scalar() == 1
