"""Unit tests of the fair share between jobs: the split, and executors agreeing through Redis.

The Redis here is fakeredis (a unit test); tests/integration/test_fair_share.py runs the
same mechanism on a real Redis with real Celery workers.
"""

from __future__ import annotations

import math
import time

import fakeredis
import pytest
import redis

from dmipro.executor_adapters._fair import ACTIVE_KEY, UNCAPPED, FairShare, split


def test_split_gives_equal_weights_equal_parts() -> None:
    parts = split(64, {b"a": (1.0, math.inf), b"b": (1.0, math.inf), b"c": (1.0, math.inf), b"d": (1.0, 500)})
    assert parts == {b"a": 16.0, b"b": 16.0, b"c": 16.0, b"d": 16.0}


def test_split_hands_what_a_small_job_leaves_to_the_others() -> None:
    parts = split(64, {b"heavy": (1.0, 400), b"small": (1.0, 4), b"mid": (1.0, 20)})
    assert parts[b"small"] == 4 and parts[b"mid"] == 20 and parts[b"heavy"] == 40


def test_split_follows_priority() -> None:
    parts = split(60, {b"urgent": (2.0, 1000), b"normal": (1.0, 1000)})
    assert parts == {b"urgent": 40.0, b"normal": 20.0}


def test_a_job_alone_is_not_capped() -> None:
    client = fakeredis.FakeRedis()
    share = FairShare(client, 64)
    assert share.cap(500) == UNCAPPED
    assert share.active_jobs == 1 and client.zcard(ACTIVE_KEY) == 1


def test_two_executors_agree_on_halves_and_the_second_leaving_restores_the_first() -> None:
    client = fakeredis.FakeRedis()
    first, second = FairShare(client, 64, slack=0, refresh_s=0), FairShare(client, 64, slack=0, refresh_s=0)
    assert first.cap(300) == UNCAPPED  # alone so far
    assert second.cap(300) == 32  # sees the first one
    assert first.cap(300) == 32  # and the first sees it back
    second.leave()
    assert client.zcard(ACTIVE_KEY) == 1
    assert first.cap(300) == UNCAPPED


def test_an_idle_executor_takes_no_share() -> None:
    client = fakeredis.FakeRedis()
    busy, idle = FairShare(client, 64, slack=0, refresh_s=0), FairShare(client, 64, slack=0, refresh_s=0)
    idle.cap(10)
    assert busy.cap(300) == 54  # the idle-to-be wants only 10
    idle.cap(0)  # nothing left to send: it leaves
    assert busy.cap(300) == UNCAPPED


def test_an_executor_that_stopped_refreshing_expires() -> None:
    client = fakeredis.FakeRedis()
    dead = FairShare(client, 64, slack=0, ttl_s=0.2, refresh_s=0)
    live = FairShare(client, 64, slack=0, refresh_s=0)
    dead.cap(300)
    assert live.cap(300) == 32
    time.sleep(0.3)
    assert live.cap(300) == UNCAPPED
    assert client.zcard(ACTIVE_KEY) == 1


def test_redis_down_lifts_the_cap_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    from tests.conftest import free_port

    client = redis.Redis(port=free_port(), socket_connect_timeout=0.2)
    share = FairShare(client, 16, slack=0)
    assert share.cap(100) == UNCAPPED
    assert "cannot reach Redis" in caplog.text


def test_weight_must_be_positive() -> None:
    with pytest.raises(ValueError, match="weight"):
        FairShare(fakeredis.FakeRedis(), 16, weight=0)
