"""Recording: sampled assignment events, many threads at once, and a database that fails for a while."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import func, select

import dmipro
from dmipro.ab import _recorder
from dmipro.ab._models import OutcomeRow
from dmipro.db import session_scope
from dmipro.errors import ExperimentError
from dmipro.events import Event
from tests.ab.conftest import register_two


def _stored() -> int:
    with session_scope() as s:
        return int(s.execute(select(func.count()).select_from(OutcomeRow)).scalar_one())


def test_assignment_events_are_a_stable_sample(recorded_events: list[Event]) -> None:
    register_two()
    exp = dmipro.ab.create("sampled", control="math_qa@1", treatment="math_qa@2", assign_sample_rate=0.1)
    for i in range(5000):
        exp.assign(f"u{i}")
    first = [e.data["unit_id"] for e in recorded_events if e.name == "dspy.ab.assign"]
    assert 400 <= len(first) <= 600
    recorded_events.clear()
    for i in range(5000):
        exp.assign(f"u{i}")
    assert [e.data["unit_id"] for e in recorded_events if e.name == "dspy.ab.assign"] == first
    event = next(e for e in recorded_events if e.name == "dspy.ab.assign")
    assert event.data["experiment"] == "sampled" and event.data["arm"] in ("control", "treatment")


def test_many_threads_recording_at_once_lose_nothing() -> None:
    register_two()
    exp = dmipro.ab.create("threads", control="math_qa@1", treatment="math_qa@2")

    def work(k: int) -> None:
        for i in range(1000):
            exp.record(f"t{k}-{i}", i % 2)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    exp.flush()
    assert _stored() == 8000


def test_outcomes_wait_in_the_buffer_while_the_database_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    register_two()
    exp = dmipro.ab.create("flaky", control="math_qa@1", treatment="math_qa@2")
    real = _recorder.session_scope
    broken = {"on": True}

    def flaky(url: str | None = None):  # type: ignore[no-untyped-def]
        if broken["on"]:
            raise RuntimeError("database is down")
        return real(url)

    monkeypatch.setattr(_recorder, "session_scope", flaky)
    for i in range(300):
        exp.record(f"u{i}", 1.0)
    with pytest.raises(ExperimentError, match="could not write 300 outcomes: RuntimeError: database is down"):
        exp.flush()
    recorder = _recorder.recorder_for(exp.url)
    assert recorder.pending == 300 and recorder.failed_writes >= 1
    broken["on"] = False
    exp.flush()  # (the writer thread may have got there first)
    assert recorder.pending == 0 and _stored() == 300
