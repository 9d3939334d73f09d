"""The job store: job rows, their datasets, phase checkpoints and the per-example evaluation cache.

Everything a coordinator needs to resume lives here, in the job database (SQLite by
default, PostgreSQL across machines). Writes are short transactions; the coordinator
is the only writer of a job's checkpoints and cache rows, so no row is contended.

Datasets are stored once, by the SHA-256 of their content (``dmipro_datasets``): a job
row's spec names each split as ``stored:sha256:<digest>``, so a hundred jobs on the
same data hold it once, and reading a job row (``status``, ``wait``) never reads its
data. :meth:`JobStore.job_spec` gives the spec with the datasets back in place.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from dmipro import defaults
from dmipro.db import Base, get_engine
from dmipro.errors import JobNotFoundError, JobSpecError
from dmipro.jobs._datasets import dataset_digest

__all__ = ["DATASET_REF", "JobRecord", "JobState", "JobStore", "check_job_id", "new_job_id", "stored_form"]

DATASET_REF = "stored:sha256:"
"""How a job row's spec names a split stored in ``dmipro_datasets`` (the prefix of its digest)."""

_SPLITS = ("trainset", "valset", "testset")

log = logging.getLogger(__name__)


class JobState(StrEnum):
    """Lifecycle of a job."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


jobs_table = sa.Table(
    "dmipro_jobs",
    Base.metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("state", sa.String(20), nullable=False),
    sa.Column("phase", sa.String(40)),
    sa.Column("executor", sa.String(20), nullable=False),
    sa.Column("spec", sa.JSON, nullable=False),
    sa.Column("progress", sa.JSON, nullable=False),
    sa.Column("result", sa.JSON),
    sa.Column("error", sa.Text),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float),
    sa.Column("finished_at", sa.Float),
    sa.Column("updated_at", sa.Float, nullable=False),
)
checkpoints_table = sa.Table(
    "dmipro_checkpoints",
    Base.metadata,
    sa.Column("job_id", sa.String(64), primary_key=True),
    sa.Column("phase", sa.String(40), primary_key=True),
    sa.Column("data", sa.JSON, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)
datasets_table = sa.Table(
    "dmipro_datasets",
    Base.metadata,
    sa.Column("digest", sa.String(64), primary_key=True),
    sa.Column("records", sa.JSON, nullable=False),
    sa.Column("rows", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)
eval_cache_table = sa.Table(
    "dmipro_eval_cache",
    Base.metadata,
    sa.Column("job_id", sa.String(64), primary_key=True),
    sa.Column("fingerprint", sa.String(64), primary_key=True),
    sa.Column("example_id", sa.String(64), primary_key=True),
    sa.Column("score", sa.Float, nullable=False),
    sa.Column("error", sa.Text),
)


_JOB_ID = re.compile(defaults.NAME_PATTERN)

_MAX_CACHED_DATASETS = 8
"""Datasets a process keeps after reading them (by digest: their content never changes)."""
_datasets: dict[str, list[Any]] = {}
_datasets_lock = threading.Lock()


def check_job_id(job_id: object) -> str:
    """Return ``job_id`` if it is a valid job id, else raise :class:`JobSpecError`.

    Ids name files (``programs/<id>.json``), Redis keys and task ids, so they follow the
    one name pattern: no ``/``, no leading ``.``, at most 64 characters.
    """
    if not isinstance(job_id, str) or len(job_id) > defaults.MAX_JOB_ID or not _JOB_ID.fullmatch(job_id):
        raise JobSpecError(f"invalid job id {str(job_id)[:80]!r}: use 1-{defaults.MAX_JOB_ID} letters, "
                           "digits, '_', '.' or '-', starting with a letter or digit", field="job_id")
    return job_id


def stored_form(spec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """``spec`` as a job row holds it (each inline split replaced by its reference), and the splits by digest.

    The digest is the full SHA-256 of the canonical JSON: a dataset is only ever found by
    its whole content's hash, so one job cannot name another's data without having it.
    """
    stored = dict(spec)
    data: dict[str, list[Any]] = {}
    for split in _SPLITS:
        records = spec.get(split)
        if isinstance(records, list):
            digest = dataset_digest(records)
            data[digest] = records
            stored[split] = DATASET_REF + digest
    return stored, data


def new_job_id(name: str) -> str:
    """A fresh job id: the job name and 12 random hex digits."""
    return f"{name[:40]}-{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class JobRecord:
    """One job row."""

    id: str
    name: str
    state: JobState
    phase: str | None
    executor: str
    spec: dict[str, Any]
    progress: dict[str, Any]
    result: dict[str, Any] | None
    error: str | None
    cancel_requested: bool
    attempts: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    updated_at: float

    @property
    def shown_phase(self) -> str | None:
        """The phase to show: ``done`` once the job succeeded (the row keeps its last phase)."""
        return "done" if self.state is JobState.SUCCEEDED else self.phase

    def to_json(self, *, with_spec: bool = False) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
        if not with_spec:
            data.pop("spec")
        return data


class JobStore:
    """Jobs, checkpoints and cached scores in the job database at ``url`` (default: settings)."""

    def __init__(self, url: str | None = None) -> None:
        self.engine = get_engine(url)

    @property
    def url(self) -> str:
        """The database URL, password included (for opening the same database elsewhere in-process)."""
        return str(self.engine.url.render_as_string(hide_password=False))

    # jobs -----------------------------------------------------------------
    def create(
        self, *, name: str, spec: dict[str, Any], executor: str, job_id: str | None = None
    ) -> JobRecord:
        now = time.time()
        stored, datasets = stored_form(spec)
        row = {
            "id": check_job_id(job_id) if job_id is not None else new_job_id(name),
            "name": name,
            "state": JobState.QUEUED.value,
            "phase": None,
            "executor": executor,
            "spec": stored,
            "progress": {},
            "result": None,
            "error": None,
            "cancel_requested": False,
            "attempts": 0,
            "created_at": now,
            "started_at": None,
            "finished_at": None,
            "updated_at": now,
        }
        insert: Any = postgresql.insert if self.engine.dialect.name == "postgresql" else sqlite.insert
        with self.engine.begin() as conn:  # the datasets and the row that names them, or neither
            for digest, records in datasets.items():
                values = {"digest": digest, "records": records, "rows": len(records), "created_at": now}
                conn.execute(insert(datasets_table).values(**values).on_conflict_do_nothing())
            conn.execute(jobs_table.insert().values(**row))
        return self.get(str(row["id"]))

    def job_spec(self, job_id: str) -> dict[str, Any]:
        """The spec job ``job_id`` was created with, its datasets back in place."""
        return self.hydrate(self.get(job_id).spec)

    def hydrate(self, spec: dict[str, Any]) -> dict[str, Any]:
        """``spec`` with every stored split (``stored:sha256:...``) replaced by its records."""
        out = dict(spec)
        for split in _SPLITS:
            value = spec.get(split)
            if isinstance(value, str) and value.startswith(DATASET_REF):
                out[split] = self._dataset(value.removeprefix(DATASET_REF))
        return out

    def _dataset(self, digest: str) -> list[Any]:
        with _datasets_lock:
            cached = _datasets.get(digest)
        if cached is not None:
            return cached
        with self.engine.connect() as conn:
            records = conn.execute(
                sa.select(datasets_table.c.records).where(datasets_table.c.digest == digest)
            ).scalar_one_or_none()
        if not isinstance(records, list):
            raise JobSpecError(f"the job's dataset {digest[:12]}... is not in the job database")
        with _datasets_lock:
            _datasets[digest] = records
            while len(_datasets) > _MAX_CACHED_DATASETS:
                _datasets.pop(next(iter(_datasets)))
        return records

    def find(self, job_id: str) -> JobRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(jobs_table).where(jobs_table.c.id == job_id)).mappings().first()
        if row is None:
            return None
        data = dict(row)
        data["state"] = JobState(data["state"])
        return JobRecord(**data)

    def get(self, job_id: str) -> JobRecord:
        record = self.find(job_id)
        if record is None:
            raise JobNotFoundError(f"no job {job_id!r} in the job database")
        return record

    def list(self, limit: int = 50) -> list[JobRecord]:
        with self.engine.connect() as conn:
            ids = (
                conn.execute(sa.select(jobs_table.c.id).order_by(jobs_table.c.created_at.desc()).limit(limit))
                .scalars()
                .all()
            )
        return [self.get(i) for i in ids]

    def update(self, job_id: str, **fields: Any) -> None:
        fields = {k: (v.value if isinstance(v, JobState) else v) for k, v in fields.items()}
        fields["updated_at"] = time.time()
        with self.engine.begin() as conn:
            result = conn.execute(jobs_table.update().where(jobs_table.c.id == job_id).values(**fields))
        if result.rowcount == 0:
            raise JobNotFoundError(f"no job {job_id!r} in the job database")

    def start(self, job_id: str, executor: str) -> JobRecord:
        """Mark a job running (again): one more attempt; the first start time is kept."""
        record = self.get(job_id)
        self.update(
            job_id,
            state=JobState.RUNNING,
            executor=executor,
            attempts=record.attempts + 1,
            started_at=record.started_at or time.time(),
            finished_at=None,
            error=None,
        )
        return self.get(job_id)

    def set_progress(self, job_id: str, phase: str | None = None, **progress: Any) -> None:
        """Merge ``progress`` into the job's progress dict (and set the phase)."""
        record = self.get(job_id)
        merged = {**record.progress, **progress}
        fields: dict[str, Any] = {"progress": merged}
        if phase is not None:
            fields["phase"] = phase
        self.update(job_id, **fields)

    def finish(
        self, job_id: str, state: JobState, *, result: dict[str, Any] | None = None, error: str | None = None
    ) -> None:
        self.update(job_id, state=state, result=result, error=error, finished_at=time.time())

    def request_cancel(self, job_id: str) -> JobRecord:
        record = self.get(job_id)
        if not record.state.finished:
            self.update(job_id, cancel_requested=True)
            if record.state is JobState.QUEUED:
                self.finish(job_id, JobState.CANCELLED, error="cancelled before it started")
        return self.get(job_id)

    @contextmanager
    def heartbeat(self, job_id: str, every: float | None = None) -> Iterator[None]:
        """Mark the job row alive every ``every`` seconds (``HEARTBEAT_S``) while the block runs.

        ``status`` reports a running job whose row stays silent as ``stale``: its coordinator died.
        """
        interval = every or defaults.HEARTBEAT_S
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(interval):
                try:
                    self.update(job_id)
                except Exception as exc:  # the database away for a moment: beat again next time
                    log.warning("marking job %s alive failed: %s", job_id, exc)

        thread = threading.Thread(target=beat, daemon=True, name=f"dmipro-heartbeat-{job_id}")
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=interval)

    def cancel_requested(self, job_id: str) -> bool:
        with self.engine.connect() as conn:
            value = conn.execute(
                sa.select(jobs_table.c.cancel_requested).where(jobs_table.c.id == job_id)
            ).scalar()
        return bool(value)

    # checkpoints ------------------------------------------------------------
    def save_checkpoint(self, job_id: str, phase: str, data: dict[str, Any]) -> None:
        """Store (or replace) the output of a finished phase."""
        with self.engine.begin() as conn:
            conn.execute(
                checkpoints_table.delete().where(
                    (checkpoints_table.c.job_id == job_id) & (checkpoints_table.c.phase == phase)
                )
            )
            conn.execute(
                checkpoints_table.insert().values(
                    job_id=job_id, phase=phase, data=data, created_at=time.time()
                )
            )

    def load_checkpoint(self, job_id: str, phase: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            data = conn.execute(
                sa.select(checkpoints_table.c.data).where(
                    (checkpoints_table.c.job_id == job_id) & (checkpoints_table.c.phase == phase)
                )
            ).scalar()
        return dict(data) if data is not None else None

    # evaluation cache ---------------------------------------------------------
    def cached_scores(self, job_id: str, fingerprint: str) -> dict[str, tuple[float, str | None]]:
        """Every cached ``example_id -> (score, error)`` for one candidate."""
        t = eval_cache_table
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(t.c.example_id, t.c.score, t.c.error).where(
                    (t.c.job_id == job_id) & (t.c.fingerprint == fingerprint)
                )
            ).all()
        return {r.example_id: (r.score, r.error) for r in rows}

    def put_scores(
        self, job_id: str, fingerprint: str, rows: Iterable[tuple[str, float, str | None]]
    ) -> None:
        """Cache per-example scores; a row already present is left as it is (idempotent)."""
        values = [
            {"job_id": job_id, "fingerprint": fingerprint, "example_id": eid, "score": score, "error": error}
            for eid, score, error in rows
        ]
        if not values:
            return
        dialect = self.engine.dialect.name
        if dialect == "postgresql":
            stmt: Any = postgresql.insert(eval_cache_table).values(values).on_conflict_do_nothing()
        elif dialect == "sqlite":
            stmt = sqlite.insert(eval_cache_table).values(values).on_conflict_do_nothing()
        else:
            stmt = eval_cache_table.insert().values(values)
        with self.engine.begin() as conn:
            conn.execute(stmt)
