"""``dmipro.queue.depth``: the broker's waiting tasks, read from a real Redis, as an OTel gauge."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from dmipro import observability
from dmipro.config import Settings, reload_settings
from dmipro.subscribers._queues import queue_depths


def _depths(reader: InMemoryMetricReader) -> dict[tuple[str, str], int]:
    data = reader.get_metrics_data()
    assert data is not None
    return {
        (p.attributes["dmipro.broker"], p.attributes["dmipro.queue"]): int(p.value)
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "dmipro.queue.depth"
        for p in m.data.data_points
    }


def test_queue_depth_gauge_reads_celery_and_rq_queues(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, quiet_otel: None
) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    client.rpush("dmipro.work", *[b"task"] * 3)  # Celery's Redis transport: one list per queue
    client.rpush("rq:queue:dmipro.coordinator", b"job-id")
    monkeypatch.setenv("DMIPRO_BROKER_URL", redis_url)
    reload_settings()
    reader = InMemoryMetricReader()
    observability.setup(Settings(subscribers=("otel",)), metric_readers=[reader])
    depths = _depths(reader)
    assert depths[("celery", "dmipro.work")] == 3
    assert depths[("rq", "dmipro.coordinator")] == 1
    assert depths[("celery", "dmipro.coordinator")] == 0
    client.lpop("dmipro.work")
    assert _depths(reader)[("celery", "dmipro.work")] == 2  # observed anew at each collection


def test_no_broker_configured_means_no_observation_and_a_dead_one_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("DMIPRO_BROKER_URL", raising=False)
    reload_settings()
    assert queue_depths() == []  # threads only: no Redis is dialled
    with caplog.at_level("WARNING", logger="dmipro.subscribers._queues"):
        assert queue_depths("redis://127.0.0.1:1/0") == []
    assert "dmipro.queue.depth" in caplog.text
