"""The reconciler's decisions, on a real Redis and a real job database (brokers stand in as callables).

The end-to-end cases — a message deleted from a real Celery or RQ queue, an RQ coordinator
killed — are in tests/integration/test_chaos.py; these pin down what it leaves alone and
how it gives up.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from dmipro.events import Event
from dmipro.jobs.store import JobRecord, JobState, JobStore
from dmipro.workers import _reconcile
from dmipro.workers._reconcile import MAX_RESENDS, Reconciler

pytestmark = pytest.mark.integration


@pytest.fixture
def client(redis_url: str) -> Any:
    import redis

    conn = redis.Redis.from_url(redis_url)
    yield conn
    conn.close()


@pytest.fixture(autouse=True)
def no_recheck_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_reconcile, "RECHECK_S", 0.0)


def reconciler(client: Any, held: set[str], sent: list[str], grace_s: float = 0.0) -> Reconciler:
    def resend(record: JobRecord) -> None:
        sent.append(record.id)

    return Reconciler(
        "celery", client=client, held=lambda ids: held & set(ids), resend=resend, grace_s=grace_s
    )


def job(state: JobState = JobState.QUEUED, executor: str = "celery") -> str:
    store = JobStore()
    record = store.create(name="r", spec={"name": "r"}, executor=executor)
    if state is not JobState.QUEUED:
        store.update(record.id, state=state)
    return record.id


def test_only_an_unheld_unleased_unfinished_job_of_its_backend_is_sent_again(
    client: Any, recorded_events: list[Event]
) -> None:
    lost = job()
    running_lost = job(JobState.RUNNING)
    waiting = job()  # its message is in the queue
    leased = job(JobState.RUNNING)  # a coordinator runs it
    client.set(f"dmipro:lease:{leased}", "token")
    job(JobState.SUCCEEDED)
    job(executor="rq")  # another backend's
    sent: list[str] = []
    resent = reconciler(client, {waiting}, sent).run_once()
    assert sorted(resent) == sorted(sent) == sorted([lost, running_lost])
    assert client.get(f"dmipro:resent:{lost}") == b"1"
    requeued = [e for e in recorded_events if e.name == "dspy.optimization.requeued"]
    assert sorted(e.job_id for e in requeued) == sorted([lost, running_lost])  # type: ignore[type-var]
    assert requeued[0].data["backend"] == "celery" and requeued[0].data["resends"] == 1


def test_a_job_inside_its_grace_period_is_left_alone(client: Any) -> None:
    job()
    sent: list[str] = []
    assert reconciler(client, set(), sent, grace_s=60).run_once() == [] and sent == []


def test_a_job_that_keeps_losing_its_message_fails_with_the_reason(
    client: Any, recorded_events: list[Event]
) -> None:
    lost = job()
    sent: list[str] = []
    for _ in range(MAX_RESENDS + 1):
        reconciler(client, set(), sent).run_once()
        time.sleep(0.01)
    assert len(sent) == MAX_RESENDS
    record = JobStore().get(lost)
    assert record.state is JobState.FAILED and "lost 6 times" in (record.error or "")
    assert [e.data["error_type"] for e in recorded_events if e.name == "dspy.optimization.error"] == [
        "LostMessageError"
    ]


def test_one_pass_at_a_time_across_workers(client: Any) -> None:
    job()
    client.set("dmipro:reconcile:celery", "another worker")
    sent: list[str] = []
    assert reconciler(client, set(), sent).run_once() == [] and sent == []
