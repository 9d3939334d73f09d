"""Default values and key names, named once."""

from __future__ import annotations

DEFAULT_HOME = ".dmipro"
"""Directory (relative to the current directory) for the embedded SQLite database and files."""

DEFAULT_DATABASE_FILE = "dmipro.db"
"""File name of the embedded SQLite database inside ``DEFAULT_HOME``."""

DEFAULT_ALLOWED_MODULES = ("examples",)
"""Module prefixes workers may import program and metric references from."""

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
"""Celery broker and RQ connection when ``DMIPRO_BROKER_URL`` is not set."""

DEFAULT_RESULT_BACKEND = "redis://127.0.0.1:6379/1"
"""Celery result backend when ``DMIPRO_RESULT_BACKEND`` is not set."""

DEFAULT_CONCURRENCY = 16
"""Thread-pool size when a job does not name one."""

DEFAULT_CHUNK_SIZE = 5
"""Examples per ``evaluate_chunk`` task (small: LM calls are slow, tasks are cheap)."""

COORDINATOR_QUEUE = "dmipro.coordinator"
"""Queue the ``optimize`` coordinator task runs on."""

WORK_QUEUE = "dmipro.work"
"""Queue every work task (evaluate, bootstrap, propose) runs on."""

CONFIG_FILE = "dmipro.yaml"
"""Optional settings file looked up in the current directory."""

DEFAULT_ALLOWED_KEY_ENVS = ("*_API_KEY",)
"""Environment variables a job may name as its ``api_key_env`` unless the operator says otherwise."""

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}"
"""Job names, job ids and program names: a letter or digit, then up to 127 letters, digits, ``_``, ``.``
or ``-``. No ``/``, no leading ``.``: every file name derived from one stays in its directory."""

MAX_JOB_ID = 64
"""Longest job id (the job table's key column)."""

HEARTBEAT_S = 10.0
"""How often a coordinator running on a worker marks its job row as alive."""

VISIBILITY_TIMEOUT_S = 3600.0
"""Seconds before the Redis broker redelivers a message a silent worker holds (Celery and kombu)."""

STALE_AFTER_S = 60.0
"""A running job whose coordinator has not marked it alive for this long is reported ``stale``."""

MAX_TRIALS = 2000
"""Default cap on a job's ``num_trials`` (``auto: heavy`` asks for far fewer)."""

MAX_CANDIDATES = 200
"""Default cap on a job's ``num_candidates``."""

MAX_DATASET_ROWS = 100_000
"""Default cap on the examples in one split."""

MAX_PAYLOAD_BYTES = 64 * 1024 * 1024
"""Default cap on a job's size as JSON (its spec with the datasets inline): 64 MiB."""

DEFAULT_RECONCILE_INTERVAL_S = 60.0
"""Seconds between two passes of a coordinator worker's reconciler (0 turns it off)."""

DEFAULT_RECONCILE_GRACE_S = 60.0
"""Seconds an unfinished job's row must stay unchanged before the reconciler looks for its message."""

# -- timeouts and TTLs of the transport (one place, so an operator finds them all) -----------

LM_DEADLINE_S = 600.0
"""How long one LM call may keep retrying transient errors (``lm.retry.deadline_s``)."""

CELERY_RESULT_EXPIRES_S = 7 * 24 * 3600
"""How long Celery task results stay in the result backend."""

RQ_WORK_TIMEOUT_S = 3600
"""RQ job timeout of a work task: a chunk of LM calls, with provider retries and back-off."""

RQ_COORDINATOR_TIMEOUT_S = 7 * 24 * 3600
"""RQ job timeout of a coordinator: a whole optimization."""

RQ_RESULT_TTL_S = 24 * 3600
"""How long RQ results stay in Redis (the coordinator reads them within moments)."""

RQ_FAILURE_TTL_S = 7 * 24 * 3600
"""How long failed RQ jobs stay in RQ's failed registry, for inspection."""

RQ_WORKER_ALIVE_TTL_S = 15
"""Seconds a dmipro RQ worker's key outlives its last heartbeat (it beats every third of that)."""

SHARED_LM_CACHE_TTL_S = 7 * 24 * 3600
"""How long an entry of the shared LM response cache (``lm.cache: shared``) lives in Redis."""
