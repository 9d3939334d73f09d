"""A job's coordinator as workers run it: one per job, at a time, at least once.

This is the one entry point of a coordinator on a worker: the Celery task
``dmipro.optimize`` and the RQ job function ``run_optimize`` both call
:func:`run_coordinator`. It is not in the task table: no executor may run it as an
ordinary task, because only the holder of the job's lease may.

Brokers deliver at least once, so a coordinator message can arrive twice: redelivered
after its worker died, or submitted twice. :func:`run_coordinator` makes that safe:

- a job that is already finished (or was cancelled before it started) is reported, not run;
- a *job lease* in Redis (``dmipro:lease:<job id>``, renewed while the coordinator runs)
  lets one coordinator run a job at a time. A second delivery waits for the lease: when
  the holder finishes it reports the result, when the holder's process died the lease
  expires and it takes over, resuming from the checkpoints and the Optuna study;
- a coordinator that fails before the job row says so marks the job failed, so
  ``status`` never shows a dead job as queued;
- a coordinator whose job database went away (a PostgreSQL restart) does not fail the
  job: it waits for the database and resumes, at most :data:`DATABASE_RESUMES` times.

The lease lives ``lease_ttl`` seconds without renewal (``DMIPRO_LEASE_TTL``; default:
the ``visibility_timeout`` setting, bounded to 2..60 s).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis

from dmipro.config import get_settings
from dmipro.db import database_gone
from dmipro.errors import DecodeError, DmiproError
from dmipro.executor_adapters.task_table import decode_payload
from dmipro.jobs.store import JobRecord, JobState, JobStore
from dmipro.teleprompt.mipro import run_job

__all__ = [
    "DATABASE_RESUMES",
    "SUMMARY_KEYS",
    "job_summary",
    "run_coordinator",
]

log = logging.getLogger(__name__)

DATABASE_RESUMES = 3
"""Times a coordinator resumes its job in place after the job database went away under it."""

SUMMARY_KEYS = (
    "job_id", "baseline_score", "best_score", "trials", "lm_calls", "tokens", "cost_usd", "wall_s",
    "stop_reason", "program_path", "registered",
)
"""Keys of the summary an ``optimize`` task returns (the ``--json`` report of a run)."""


def job_summary(record: JobRecord) -> dict[str, Any]:
    """What an ``optimize`` task returns for ``record``: the run summary and the job's state."""
    result = record.result or {}
    summary = {key: result.get(key) for key in SUMMARY_KEYS}
    summary.update(job_id=record.id, state=record.state.value, error=record.error)
    return summary


@contextmanager
def _job_lease(job_id: str, store: JobStore) -> Iterator[bool]:
    """Hold the job's lease for the block; yields False when the job finished while waiting.

    Without a Redis broker there is nothing to lease with: the block runs unguarded.
    """
    settings = get_settings()
    url = settings.broker_url
    if not url.startswith(("redis://", "rediss://", "unix://")):
        yield True
        return
    ttl = settings.effective_lease_ttl
    client = redis.Redis.from_url(url)
    key, token = f"dmipro:lease:{job_id}", uuid.uuid4().hex
    waited = False
    try:
        while not client.set(key, token, nx=True, px=int(ttl * 1000)):
            if not waited:
                log.info("job %s is being coordinated elsewhere; waiting for its lease", job_id)
                waited = True
            if store.get(job_id).state.finished:
                yield False
                return
            time.sleep(min(1.0, ttl / 4))
        stop = threading.Event()
        renewer = threading.Thread(target=_renew, args=(client, key, token, ttl, stop), daemon=True,
                                   name=f"dmipro-lease-{job_id}")
        renewer.start()
        try:
            yield True
        finally:
            stop.set()
            renewer.join(timeout=ttl)
            _release(client, key, token)
    finally:
        client.close()


# Renew our lease; take it back when the key vanished (Redis restarted without its data),
# so the reconciler never sees a running job as unleased. Someone else's lease is not ours.
_RENEW = ("local v = redis.call('get', KEYS[1]) "
          "if v == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end "
          "if not v then redis.call('set', KEYS[1], ARGV[1], 'px', ARGV[2]) return 2 end return 0")
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


def _renew(client: Any, key: str, token: str, ttl: float, stop: threading.Event) -> None:
    while not stop.wait(ttl / 3):
        try:
            renewed = client.eval(_RENEW, 1, key, token, int(ttl * 1000))
            if not renewed:
                log.error("lost the lease %s: another coordinator may run this job now", key)
                return
            if renewed == 2:
                log.warning("the lease %s had vanished from Redis (restarted?); took it back", key)
        except Exception as exc:  # Redis away for a moment: try again next beat
            log.warning("renewing lease %s failed: %s", key, exc)


def _release(client: Any, key: str, token: str) -> None:
    try:
        client.eval(_RELEASE, 1, key, token)
    except Exception as exc:  # it expires on its own
        log.warning("releasing lease %s failed: %s", key, exc)


def run_coordinator(body: str, *, backend: str,
                    on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run (or resume, or just report) the job named in an ``optimize`` payload; see the module docstring.

    ``body`` is the task's JSON payload (``job_id``, optional ``executor``); work tasks go
    to ``executor``, by default ``backend``. Returns :func:`job_summary` of the job.
    """
    payload = decode_payload(body, what="optimize")
    if not isinstance(payload.get("job_id"), str) or not payload["job_id"]:
        raise DecodeError("optimize payload must be a JSON object with a job_id string")
    job_id = payload["job_id"]
    executor = payload.get("executor") or backend
    store = JobStore()
    if store.get(job_id).state.finished:
        return job_summary(store.get(job_id))
    with _job_lease(job_id, store) as held:
        record = store.get(job_id)
        if not held or record.state.finished:
            return job_summary(record)
        for attempt in range(1, DATABASE_RESUMES + 2):
            try:
                run_job(job_id, executor=executor, on_progress=on_progress, store=store)
                break
            except Exception as exc:
                if database_gone(exc) and attempt <= DATABASE_RESUMES:
                    # The database restarted under the coordinator: once it answers again, resume
                    # from the checkpoints and the study, as a redelivered coordinator would.
                    log.warning("job %s: the job database went away (%s: %s); resuming when it is back "
                                "(%d/%d)", job_id, type(exc).__name__, exc, attempt, DATABASE_RESUMES)
                    store.find(job_id)  # waits for the database (see dmipro.db.patient_connects)
                    continue
                current = store.find(job_id)
                if current is not None and not current.state.finished:
                    message = str(exc) if isinstance(exc, DmiproError) else f"{type(exc).__name__}: {exc}"
                    store.finish(job_id, JobState.FAILED, error=message)
                raise
    return job_summary(store.get(job_id))
