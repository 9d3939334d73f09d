"""The event bus: glob subscriptions, correlation ids, isolation of failing subscribers, exactly once."""

from __future__ import annotations

import json
import logging
import threading

import pytest

from dmipro.events import (
    EVENT_NAMES,
    Event,
    EventBus,
    Subscriber,
    bus,
    correlate,
    current_job_id,
    current_trial,
)


class Recorder(Subscriber):
    def __init__(self, *patterns: str) -> None:
        self.patterns = patterns or ("*",)
        self.events: list[Event] = []
        self.closed = False

    def on_event(self, event: Event) -> None:
        self.events.append(event)

    def close(self) -> None:
        self.closed = True

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.events]


class Exploding(Subscriber):
    def on_event(self, event: Event) -> None:
        raise RuntimeError("subscriber bug")


def test_the_process_bus_is_an_event_bus() -> None:
    assert isinstance(bus, EventBus)


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        (
            "*",
            [
                "dspy.optimization.start",
                "dspy.optimization.trial_complete",
                "dspy.evaluation.start",
                "dspy.storage.save",
            ],
        ),
        ("dspy.optimization.*", ["dspy.optimization.start", "dspy.optimization.trial_complete"]),
        ("dspy.*.start", ["dspy.optimization.start", "dspy.evaluation.start"]),
        ("dspy.storage.save", ["dspy.storage.save"]),
        ("dspy.registry.*", []),
    ],
)
def test_glob_subscriptions(pattern: str, expected: list[str]) -> None:
    events = EventBus()
    seen: list[str] = []
    events.subscribe(pattern, lambda e: seen.append(e.name))
    for name in [
        "dspy.optimization.start",
        "dspy.optimization.trial_complete",
        "dspy.evaluation.start",
        "dspy.storage.save",
    ]:
        events.emit(name)
    assert seen == expected


def test_events_carry_their_data_and_are_json_ready() -> None:
    events = EventBus()
    rec = events.add(Recorder())
    returned = events.emit("dspy.evaluation.batch_complete", score=61.5, n=20, split="val")
    assert isinstance(rec, Recorder) and rec.events == [returned]
    assert dict(returned.data) == {"score": 61.5, "n": 20, "split": "val"}
    data = json.loads(json.dumps(returned.to_json()))
    assert data["name"] == "dspy.evaluation.batch_complete" and data["data"]["score"] == 61.5
    assert data["timestamp"] > 0 and len(data["event_id"]) == 32


def test_correlate_stamps_job_and_trial() -> None:
    events = EventBus()
    rec = events.add(Recorder())
    events.emit("dspy.optimization.start")
    with correlate(job_id="job-1"):
        assert current_job_id() == "job-1" and current_trial() is None
        events.emit("dspy.optimization.bootstrap_complete")
        with correlate(trial=3):
            assert (current_job_id(), current_trial()) == ("job-1", 3)
            events.emit("dspy.optimization.trial_start")
            # Explicit values win over the context.
            events.emit("dspy.optimization.trial_complete", job_id="job-2", trial=4)
        events.emit("dspy.optimization.complete")
    events.emit("dspy.optimization.error")
    assert [(e.job_id, e.trial) for e in rec.events] == [
        (None, None),
        ("job-1", None),
        ("job-1", 3),
        ("job-2", 4),
        ("job-1", None),
        (None, None),
    ]
    # The ids travel on the event, not in its data.
    assert all("job_id" not in e.data and "trial" not in e.data for e in rec.events)


def test_correlation_is_restored_after_an_error() -> None:
    with pytest.raises(KeyError), correlate(job_id="job-1", trial=0):
        raise KeyError("boom")
    assert (current_job_id(), current_trial()) == (None, None)


def test_trial_zero_is_a_trial() -> None:
    events = EventBus()
    rec = events.add(Recorder())
    with correlate(job_id="j", trial=0):
        events.emit("dspy.optimization.trial_start")
    assert rec.events[0].trial == 0


def test_correlation_is_per_thread() -> None:
    events = EventBus()
    rec = events.add(Recorder())
    ready = threading.Barrier(2)

    def run(job: str) -> None:
        with correlate(job_id=job):
            ready.wait(timeout=5)
            events.emit("dspy.evaluation.start", job=job)

    threads = [threading.Thread(target=run, args=(j,)) for j in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted((e.job_id, e.data["job"]) for e in rec.events) == [("a", "a"), ("b", "b")]


def test_a_failing_subscriber_is_logged_and_the_others_still_get_the_event(
    caplog: pytest.LogCaptureFixture,
) -> None:
    events = EventBus()
    before, after = Recorder(), Recorder()
    events.add(before)
    events.add(Exploding())
    events.subscribe("*", lambda e: 1 / 0)
    events.add(after)
    with caplog.at_level(logging.ERROR, logger="dmipro.events"):
        event = events.emit("dspy.optimization.trial_complete", score=50.0)
    assert before.events == [event] and after.events == [event]
    failures = [r for r in caplog.records if r.name == "dmipro.events"]
    assert len(failures) == 2
    assert {r.exc_info[0] for r in failures if r.exc_info} == {RuntimeError, ZeroDivisionError}
    assert all("dspy.optimization.trial_complete" in r.getMessage() for r in failures)


def test_each_emit_reaches_each_subscriber_once() -> None:
    events = EventBus()
    overlapping = events.add(Recorder("dspy.*", "dspy.evaluation.*", "*"))
    other = events.add(Recorder("dspy.evaluation.start"))
    first = events.emit("dspy.evaluation.start")
    second = events.emit("dspy.evaluation.start")
    assert isinstance(overlapping, Recorder) and isinstance(other, Recorder)
    assert overlapping.events == [first, second]
    assert other.events == [first, second]
    assert first.event_id != second.event_id


def test_concurrent_emits_are_each_delivered_once() -> None:
    events = EventBus()
    counts: dict[str, int] = {}
    lock = threading.Lock()

    def count(event: Event) -> None:
        with lock:
            counts[event.event_id] = counts.get(event.event_id, 0) + 1

    events.subscribe("*", count)

    def emit_many() -> None:
        for _ in range(200):
            events.emit("dspy.evaluation.batch_complete")

    threads = [threading.Thread(target=emit_many) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(counts) == 1600 and set(counts.values()) == {1}


def test_removed_subscribers_are_closed_and_hear_nothing_more() -> None:
    events = EventBus()
    rec = events.add(Recorder())
    assert isinstance(rec, Recorder)
    events.emit("dspy.storage.save")
    events.remove(rec)
    events.emit("dspy.storage.load")
    assert rec.names == ["dspy.storage.save"] and rec.closed
    assert rec not in events.subscribers


@pytest.mark.parametrize("name", ["dspy.optimization.strat", "optimization.start", "dspy.evaluation.*", ""])
def test_unknown_event_names_are_refused(name: str) -> None:
    events = EventBus()
    rec = events.add(Recorder())
    with pytest.raises(ValueError, match="unknown event name"):
        events.emit(name)
    assert isinstance(rec, Recorder) and rec.events == []


def test_the_documented_names_are_all_known() -> None:
    for name in [
        "dspy.evaluation.start",
        "dspy.evaluation.batch_complete",
        "dspy.optimization.start",
        "dspy.optimization.complete",
        "dspy.optimization.error",
        "dspy.optimization.trial_start",
        "dspy.optimization.trial_complete",
        "dspy.optimization.bootstrap_complete",
        "dspy.optimization.instruction_proposal_complete",
        "dspy.signature.optimized",
        "dspy.signature.deployed",
        "dspy.storage.save",
        "dspy.storage.load",
        "dspy.storage.error",
    ]:
        assert name in EVENT_NAMES
