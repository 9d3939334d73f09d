"""Fair share of the fleet's work slots between the jobs running at once.

Every remote executor (one per running job) sends its tasks into the same FIFO queue. A
heavy job that shipped hundreds of evaluation chunks would make every task of a job
submitted after it wait behind all of them. So each executor keeps at most its *share*
of the fleet in the broker (queued or running) and holds the rest locally until some
finish:

the job's part of a weighted max-min fair split of ``fleet_slots`` between the jobs that
have tasks to run: a job that wants fewer slots than its weighted part gets what it
wants and the rest is split between the others (so an idle fleet is never held back by
a cap), plus ``slack`` tasks, so a worker that frees a slot finds the job's next task already
queued. A job alone on the fleet is not capped: it ships everything at once, as before
there was anyone to share with. ``fleet_slots`` is the executor's ``concurrency`` (the
slots a job may fill, by default the fleet); ``weight`` is the job's priority (``executor.priority``, 1 by
default), so a job with priority 2 gets twice the slots of a job with 1.

The executors agree through Redis (the broker): a sorted set of active executors, each
scored by the time its registration expires, and a hash of their weight and demand (the
tasks they want in the broker). Each one
refreshes its own entry every ``refresh_s`` seconds and reads the others'; an executor
that stops refreshing (its process died) drops out after ``ttl_s``. If Redis cannot be
reached the cap is lifted (a full share), and the failure is logged: fairness is lost,
work is not.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from typing import Any

__all__ = ["ACTIVE_KEY", "UNCAPPED", "WEIGHTS_KEY", "FairShare", "split"]

log = logging.getLogger(__name__)

ACTIVE_KEY = "dmipro:fair:active"
"""Sorted set: member = executor id, score = when its registration expires (epoch seconds)."""
UNCAPPED = 2**62
"""The cap of a job alone on the fleet (or when Redis cannot be reached)."""
WEIGHTS_KEY = "dmipro:fair:weight"
"""Hash: executor id -> "weight demand" of its job."""


class FairShare:
    """One job's slice of the fleet, agreed with the other jobs' executors through Redis.

    Thread safety: call :meth:`cap` and :meth:`leave` from one thread (the executor's
    collector thread).
    """

    def __init__(self, client: Any, fleet_slots: int, *, weight: float = 1.0, slack: int | None = None,
                 ttl_s: float = 15.0, refresh_s: float = 1.0) -> None:
        if weight <= 0:
            raise ValueError(f"weight must be positive, got {weight}")
        self.client = client
        self.fleet_slots = max(1, fleet_slots)
        self.weight = float(weight)
        self.slack = max(1, self.fleet_slots // 16) if slack is None else slack
        self.ttl_s, self.refresh_s = ttl_s, refresh_s
        self.id = uuid.uuid4().hex
        self._share = UNCAPPED
        self._active = 1
        self._next = 0.0
        self._demand = 0
        self._joined = False

    @property
    def active_jobs(self) -> int:
        """Jobs sharing the fleet at the last refresh (this one included)."""
        return self._active

    def cap(self, demand: int) -> int:
        """How many of this job's tasks may be in the broker now (queued or running).

        ``demand`` is how many it would like there: the tasks in flight and waiting.
        """
        now = time.time()
        if now >= self._next or (demand > 0) != (self._demand > 0):
            self._next = now + self.refresh_s
            self._demand = demand
            if demand <= 0:
                self.leave()
                self._share = UNCAPPED
            else:
                self._refresh(now, demand)
        return UNCAPPED if self._share >= UNCAPPED else self._share + self.slack

    def _refresh(self, now: float, demand: int) -> None:
        try:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.zadd(ACTIVE_KEY, {self.id: now + self.ttl_s})
                pipe.hset(WEIGHTS_KEY, self.id, f"{self.weight} {demand}")
                pipe.zrangebyscore(ACTIVE_KEY, "-inf", "(" + repr(now))
                pipe.zrangebyscore(ACTIVE_KEY, repr(now), "+inf")
                pipe.hgetall(WEIGHTS_KEY)
                _, _, expired, live, weights = pipe.execute()
            if expired:  # executors of dead processes: forget them
                with self.client.pipeline(transaction=False) as pipe:
                    pipe.zrem(ACTIVE_KEY, *expired)
                    pipe.hdel(WEIGHTS_KEY, *expired)
                    pipe.execute()
            self._joined = True
        except Exception as exc:  # Redis unreachable: keep working at a full share
            log.warning("fair share: cannot reach Redis (%s); this job is not capped for now", exc)
            self._share, self._active = UNCAPPED, 1
            return
        me = self.id.encode()
        jobs = {me: (self.weight, float(demand))}
        for member in live:
            jobs.setdefault(member if isinstance(member, bytes) else str(member).encode(),
                            _decode(weights.get(member)))
        self._active = len(jobs)
        if len(jobs) == 1:
            self._share = UNCAPPED
        else:
            self._share = max(1, math.ceil(split(self.fleet_slots, jobs)[me]))

    def leave(self) -> None:
        """Give this job's share back to the others at once (not after ``ttl_s``)."""
        if not self._joined:
            return
        try:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.zrem(ACTIVE_KEY, self.id)
                pipe.hdel(WEIGHTS_KEY, self.id)
                pipe.execute()
        except Exception as exc:
            log.warning("fair share: cannot leave (%s); the entry expires in %.0f s", exc, self.ttl_s)
        self._joined = False


def _decode(raw: Any) -> tuple[float, float]:
    """(weight, demand) from a hash value; an unreadable one counts as weight 1, demand unbounded."""
    try:
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        weight, demand = (float(part) for part in text.split())
        return (weight if weight > 0 else 1.0), max(0.0, demand)
    except (AttributeError, ValueError):
        return 1.0, math.inf


def split(slots: float, jobs: dict[bytes, tuple[float, float]]) -> dict[bytes, float]:
    """Weighted max-min fair split of ``slots`` between ``jobs`` (id -> (weight, demand)).

    Jobs that want less than their weighted part get their demand; what they leave is
    split again between the rest, by weight, until every job is either satisfied or
    gets its part of what remains.
    """
    out: dict[bytes, float] = {}
    left = dict(jobs)
    remaining = float(slots)
    while left:
        total = sum(w for w, _ in left.values())
        satisfied = {k: d for k, (w, d) in left.items() if d <= remaining * w / total}
        if not satisfied:
            for k, (w, _) in left.items():
                out[k] = remaining * w / total
            break
        for k, d in satisfied.items():
            out[k] = d
            remaining -= d
            del left[k]
    return out
