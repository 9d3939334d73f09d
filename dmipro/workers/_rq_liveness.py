"""dmipro's RQ worker class: a :class:`rq.SimpleWorker` that says it is alive, and reconciles.

A ``SimpleWorker`` running a job sets its worker key to live for the job's whole timeout
(an hour for LM work, a week for a coordinator), so after a SIGKILL nothing notices the
death for that long. :class:`Worker` keeps its key's TTL at
:data:`~dmipro.executor_adapters.rq.WORKER_ALIVE_TTL_S` from a background thread, so the
key of a dead worker is gone within seconds: the RQ executor then sends that worker's
tasks again, and the reconciler its coordinator (see
:mod:`dmipro.workers._reconcile`), which a worker on ``dmipro.coordinator`` runs.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis
from rq import SimpleWorker

from dmipro.defaults import COORDINATOR_QUEUE
from dmipro.executor_adapters.rq import WORKER_ALIVE_TTL_S
from dmipro.workers._reconcile import start_reconciler

__all__ = ["Worker"]

log = logging.getLogger(__name__)


class Worker(SimpleWorker):
    """A ``SimpleWorker`` with a short-lived key while it lives, and the reconciler on coordinator queues."""

    def work(self, *args: Any, **kwargs: Any) -> bool:
        stop = threading.Event()
        threading.Thread(target=self._keep_alive, args=(stop,), name="dmipro-rq-alive", daemon=True).start()
        if COORDINATOR_QUEUE in self.queue_names():
            start_reconciler("rq", stop)
        try:
            return bool(super().work(*args, **kwargs))
        finally:
            stop.set()

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        # RQ asks for the job's whole timeout when a job starts; the beat thread extends it instead.
        ttl = min(timeout or WORKER_ALIVE_TTL_S, WORKER_ALIVE_TTL_S)
        if pipeline is not None:
            super().heartbeat(ttl, pipeline)
            return
        try:
            super().heartbeat(ttl)
        except redis.exceptions.ConnectionError as exc:
            # RQ's dequeue loop beats right after it waited out a lost connection; a Redis
            # that takes longer to restart would end the worker. The next beat brings the key back.
            log.warning("worker %s: Redis is unreachable (%s); waiting for it", self.name, exc)

    def execute_job(self, job: Any, queue: Any) -> None:
        try:
            super().execute_job(job, queue)
        except redis.exceptions.ConnectionError as exc:
            # Redis went away while the job started or finished: RQ would end the worker.
            # The job's record went with a restarted Redis; the executor sends it again.
            log.warning("worker %s: lost Redis around job %s (%s); carrying on", self.name, job.id, exc)

    def _keep_alive(self, stop: threading.Event) -> None:
        while not stop.wait(WORKER_ALIVE_TTL_S / 3):
            if self.birth_date is None:  # not registered yet: a key now would look like a twin
                continue
            try:
                # hset (in heartbeat) brings the key back after a Redis restart, so a live worker
                # never looks dead.
                self.heartbeat(WORKER_ALIVE_TTL_S)
            except Exception as exc:  # Redis away for a moment: next beat
                log.warning("worker %s: heartbeat failed: %s", self.name, exc)
