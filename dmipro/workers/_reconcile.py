"""The reconciler: a job whose coordinator message is gone is sent again.

A submitted job waits as ``queued`` until a coordinator worker takes its ``optimize``
message. When that message is lost — Redis restarted without its data, a worker died
between taking the message and recording it as unacknowledged, an RQ worker died
holding it — nothing would ever run the job. Every coordinator worker runs a
:class:`Reconciler` when it starts and every ``reconcile_interval`` seconds
(``DMIPRO_RECONCILE_INTERVAL``, default 60; 0 turns it off). It sends a job's
coordinator again when all of these hold, twice, a moment apart (a message may be on its
way from the queue to a worker):

- the job is unfinished (``queued`` or ``running``), on this worker's backend, and its
  row has not changed for ``reconcile_grace`` seconds (``DMIPRO_RECONCILE_GRACE``,
  default 60), so a job just submitted is never touched;
- nobody holds the job's lease (``dmipro:lease:<job id>``): a running coordinator renews
  it every few seconds;
- its message is neither waiting in ``dmipro.coordinator`` nor held by a live worker
  (Celery: the queue and the broker's unacknowledged messages; RQ: the queue, or
  ``started`` on a worker whose key is alive).

Sending again under the same task id is safe even when the check raced a delivery: the
lease lets one coordinator run a job at a time, and a finished job is only reported.
Each re-send is logged, emitted as ``dspy.optimization.requeued`` and counted in Redis;
a job re-sent :data:`MAX_RESENDS` times is failed with the reason instead, so a job that
keeps losing its coordinator ends in a clear state rather than a loop. Passes of several
workers are serialized by a short Redis lock.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis
import sqlalchemy as sa

from dmipro.config import get_settings
from dmipro.defaults import COORDINATOR_QUEUE
from dmipro.events import bus, correlate
from dmipro.executor_adapters import remote_adapter
from dmipro.jobs.store import JobRecord, JobState, JobStore, jobs_table

__all__ = ["MAX_RESENDS", "Reconciler", "start_reconciler"]

log = logging.getLogger(__name__)

MAX_RESENDS = 5
"""Re-sends of one job's coordinator before the reconciler fails the job instead."""

RECHECK_S = 1.0
"""Pause between the two looks at a job that seems to have lost its message."""

_UNFINISHED = (JobState.QUEUED.value, JobState.RUNNING.value)


class Reconciler:
    """One backend's reconciler; :meth:`run_once` is a pass, :func:`start_reconciler` the loop.

    ``held(job_ids)`` returns the jobs whose coordinator message the broker still holds
    (queued, or taken by a live worker) and ``resend(record)`` sends one again; both are
    backend-specific and built by :meth:`for_backend`.
    """

    def __init__(self, backend: str, *, client: Any, held: Callable[[list[str]], set[str]],
                 resend: Callable[[JobRecord], object], grace_s: float,
                 store: JobStore | None = None) -> None:
        self.backend = backend
        self.client = client
        self.held = held
        self.resend = resend
        self.grace_s = grace_s
        self.store = store or JobStore()

    @classmethod
    def for_backend(cls, backend: str, *, grace_s: float | None = None) -> Reconciler:
        """The reconciler of ``celery`` or ``rq`` on the settings' broker."""
        settings = get_settings()
        grace = settings.reconcile_grace if grace_s is None else grace_s
        client = redis.Redis.from_url(settings.broker_url)
        adapter = remote_adapter(backend)
        return cls(backend, client=client, held=adapter.held_coordinators, grace_s=grace,
                   resend=lambda record: adapter.resend_coordinator(record.id, record.executor))

    def suspects(self) -> list[JobRecord]:
        """Unfinished jobs of this backend, unchanged for the grace period, that nobody leases."""
        cutoff = time.time() - self.grace_s
        t = jobs_table
        with self.store.engine.connect() as conn:
            ids = conn.execute(
                sa.select(t.c.id).where(t.c.state.in_(_UNFINISHED), t.c.executor == self.backend,
                                        t.c.updated_at <= cutoff).order_by(t.c.created_at)
            ).scalars().all()
        if not ids:
            return []
        leased = self.client.mget([f"dmipro:lease:{i}" for i in ids])
        return [r for i, lease in zip(ids, leased, strict=True)
                if lease is None and (r := self.store.find(i)) is not None]

    def run_once(self) -> list[str]:
        """One pass: re-send (or fail) every job whose message is gone; returns their ids."""
        lock, token = f"dmipro:reconcile:{self.backend}", uuid.uuid4().hex
        if not self.client.set(lock, token, nx=True, px=int(max(self.grace_s, 10.0) * 1000)):
            return []  # another worker is at it
        try:
            first = self.suspects()
            if not first:
                return []
            missing = {r.id for r in first} - self.held([r.id for r in first])
            if not missing:
                return []
            time.sleep(RECHECK_S)
            again = [r for r in self.suspects() if r.id in missing]
            lost = [r for r in again if r.id not in self.held([r.id for r in again])]
            for record in lost:
                self._requeue(record)
            return [r.id for r in lost]
        finally:
            if self.client.get(lock) == token.encode():
                self.client.delete(lock)

    def _requeue(self, record: JobRecord) -> None:
        key = f"dmipro:resent:{record.id}"
        count = int(self.client.incr(key))
        self.client.expire(key, 7 * 24 * 3600)
        reason = (f"its coordinator message was lost (job {record.state.value}, no lease, not in "
                  f"{COORDINATOR_QUEUE} nor held by a live {self.backend} worker)")
        with correlate(job_id=record.id):
            if count > MAX_RESENDS:
                error = (f"the job's coordinator message was lost {count} times; gave up re-sending it "
                         f"(check the {self.backend} workers' logs)")
                log.error("job %s: %s", record.id, error)
                self.store.finish(record.id, JobState.FAILED, error=error)
                bus.emit("dspy.optimization.error", error=error, error_type="LostMessageError")
                return
            log.warning("job %s: %s; sending it again (%d/%d)", record.id, reason, count, MAX_RESENDS)
            self.resend(record)
            bus.emit("dspy.optimization.requeued", backend=self.backend, reason=reason, resends=count,
                     state=record.state.value)


def start_reconciler(backend: str, stop: threading.Event, *,
                     interval_s: float | None = None) -> threading.Thread | None:
    """Run the ``backend`` reconciler now and every ``interval_s`` seconds until ``stop`` is set.

    ``interval_s`` defaults to the ``reconcile_interval`` setting; 0 starts nothing.
    Returns the (daemon) thread.
    """
    settings = get_settings()
    interval = settings.reconcile_interval if interval_s is None else interval_s
    if not settings.broker_url.startswith(("redis://", "rediss://", "unix://")):
        log.info("the coordinator reconciler needs a Redis broker; it is off")
        return None
    if interval <= 0:
        log.info("the coordinator reconciler is off (DMIPRO_RECONCILE_INTERVAL=0)")
        return None

    def loop() -> None:
        reconciler: Reconciler | None = None
        while True:
            try:
                reconciler = reconciler or Reconciler.for_backend(backend)
                resent = reconciler.run_once()
                if resent:
                    log.info("reconciler: re-sent the coordinator of %s", ", ".join(resent))
            except Exception as exc:  # Redis or the database away for a moment: try next pass
                log.warning("the %s reconciler pass failed: %s: %s", backend, type(exc).__name__, exc)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=loop, name=f"dmipro-{backend}-reconciler", daemon=True)
    thread.start()
    log.info("coordinator reconciler on: every %gs, grace %gs", interval, settings.reconcile_grace)
    return thread
