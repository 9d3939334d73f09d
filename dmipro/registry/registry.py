"""The signature registry: named programs with numbered versions, deploy and rollback.

Versions of a name are numbered 1, 2, 3... and never change once registered; each points
at a stored program in ``dmipro_programs``. At most one version per name is deployed;
:meth:`Registry.load` with a bare name returns that one. Every change of the deployed
version is a row in the deployment history, and ``rollback`` goes back to the version
deployed before the current one.

Writers serialise on the name's row: ``SELECT ... FOR UPDATE`` on PostgreSQL, an
immediate (write-locking) transaction on SQLite. The ``(name, version)`` primary key is
the backstop, and a transaction that still loses a race is retried, so concurrent
processes never lose or duplicate a version. Events go out after the commit.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import insert, select, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from dmipro.config import get_settings
from dmipro.db import get_engine, is_sqlite, session_scope
from dmipro.errors import DmiproError, NotFoundError, RegistryError, StorageError
from dmipro.events import bus
from dmipro.registry._models import DeploymentRow, NameRow, VersionRow
from dmipro.registry.diff import diff_programs
from dmipro.registry.names import format_spec, parse_spec, validate_name
from dmipro.registry.values import Deployment, NameInfo, VersionInfo, default_actor, deployment_of, ts
from dmipro.storage.database import ProgramRow, insert_program, record_from_row
from dmipro.storage.program import build_program
from dmipro.storage.record import ProgramRecord

if TYPE_CHECKING:
    import dspy

__all__ = [
    "Deployment",
    "NameInfo",
    "Registry",
    "VersionInfo",
    "default_actor",
    "deploy",
    "diff",
    "get",
    "history",
    "list_names",
    "load",
    "register",
    "rollback",
    "show",
    "versions",
]

T = TypeVar("T")
_ATTEMPTS = 8


def _transient(exc: IntegrityError | OperationalError) -> bool:
    """A lost race (duplicate key, lock timeout, deadlock, serialization failure), worth a retry."""
    if isinstance(exc, IntegrityError):
        return True
    sqlstate = getattr(exc.orig, "sqlstate", None)
    return (
        sqlstate in {"40001", "40P01", "55P03"}
        or "locked" in str(exc.orig).lower()
        or "busy" in str(exc.orig).lower()
    )


class Registry:
    """Named, versioned programs in the dmipro database (``url`` defaults to the configured one).

    Safe to use from many threads and processes at once; each method is one transaction.
    """

    def __init__(self, url: str | None = None) -> None:
        self.url = url or get_settings().effective_database_url

    # -- writes -----------------------------------------------------------------------

    def register(
        self,
        name: str,
        record: ProgramRecord | str,
        *,
        deploy: bool | None = None,
        actor: str | None = None,
    ) -> VersionInfo:
        """Add ``record`` as the next version of ``name`` and return it.

        ``record`` is a :class:`ProgramRecord` (stored now, in the same transaction) or the
        id of a program already in the database store. ``deploy=None`` follows the
        ``registry`` settings: with ``auto_deploy`` on, the new version is deployed when
        nothing is deployed yet, or when its best score beats the deployed version's by
        more than zero and at least ``deploy_margin``.
        """
        validate_name(name)
        if not isinstance(record, ProgramRecord | str):
            raise RegistryError(
                f"expected a ProgramRecord or a stored program id, got {type(record).__name__}"
            )
        who = actor or default_actor()
        policy = get_settings().registry

        def txn(s: Session) -> tuple[VersionInfo, Deployment | None]:
            now = time.time()
            row = self._lock(s, name, create=True)
            assert row is not None
            version = row.latest_version + 1
            if isinstance(record, ProgramRecord):
                rec = record
                program_id = uuid.uuid4().hex
                insert_program(s, program_id, rec)
                s.flush()
            else:
                program_id = record
                prow = s.get(ProgramRow, program_id)
                if prow is None:
                    raise NotFoundError(f"no stored program with id {program_id!r} in the database store")
                rec = record_from_row(prow)
            best = rec.metadata.best_score
            s.add(
                VersionRow(
                    name=name,
                    version=version,
                    program_id=program_id,
                    best_score=best,
                    created_by=who,
                    created_at=now,
                )
            )
            row.latest_version = version
            row.updated_at = now
            s.flush()
            do_deploy = deploy if deploy is not None else self._should_auto_deploy(s, row, best, policy)
            dep = self._set_deployed(s, row, version, "deploy", who, now) if do_deploy else None
            info = VersionInfo(
                name=name,
                version=version,
                program_id=program_id,
                best_score=best,
                baseline_score=rec.metadata.baseline_score,
                job_id=rec.metadata.job_id,
                program_ref=rec.metadata.program_ref,
                created_by=who,
                created_at=ts(now),
                deployed=bool(do_deploy),
            )
            return info, dep

        info, dep = self._write(txn)
        data = {
            "name": name,
            "version": info.version,
            "program_id": info.program_id,
            "best_score": info.best_score,
            "baseline_score": info.baseline_score,
            "program_ref": info.program_ref,
            "actor": who,
        }
        bus.emit("dspy.signature.optimized", job_id=info.job_id, **data)
        bus.emit("dspy.registry.register", job_id=info.job_id, deployed=info.deployed, **data)
        if dep is not None:
            self._emit_deployed(dep)
        return info

    def deploy(self, name: str, version: int, *, actor: str | None = None) -> Deployment | None:
        """Make ``name@version`` the deployed version; None if it already was."""
        validate_name(name)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise RegistryError(f"version must be a positive whole number, got {version!r}")
        who = actor or default_actor()

        def txn(s: Session) -> Deployment | None:
            row = self._lock(s, name, create=False)
            if row is None:
                raise NotFoundError(self._no_name(name))
            self._version_row(s, row, version)
            if row.deployed_version == version:
                return None
            return self._set_deployed(s, row, version, "deploy", who, time.time())

        dep = self._write(txn)
        if dep is not None:
            self._emit_deployed(dep)
        return dep

    def rollback(self, name: str, *, actor: str | None = None) -> Deployment:
        """Deploy again the version that was deployed before the current one."""
        validate_name(name)
        who = actor or default_actor()

        def txn(s: Session) -> Deployment:
            row = self._lock(s, name, create=False)
            if row is None:
                raise NotFoundError(self._no_name(name))
            if row.deployed_version is None:
                raise RegistryError(f"nothing of {name!r} is deployed, so there is nothing to roll back")
            stack = self._deploy_stack(s, name)
            if len(stack) < 2:
                raise RegistryError(
                    f"{format_spec(name, row.deployed_version)} is the first deployed version of {name!r}; "
                    "there is no earlier deployment to roll back to"
                )
            return self._set_deployed(s, row, stack[-2], "rollback", who, time.time())

        dep = self._write(txn)
        bus.emit("dspy.registry.rollback", **dep.to_json())
        self._emit_deployed(dep)
        return dep

    # -- reads ------------------------------------------------------------------------

    def list_names(self) -> list[NameInfo]:
        """Every registered name, alphabetically."""
        with self._read() as s:
            rows = s.execute(select(NameRow).order_by(NameRow.name)).scalars()
            return [
                NameInfo(r.name, r.latest_version, r.deployed_version, ts(r.created_at), ts(r.updated_at))
                for r in rows
            ]

    def versions(self, name: str) -> list[VersionInfo]:
        """Every version of ``name``, oldest first."""
        validate_name(name)
        with self._read() as s:
            row = s.get(NameRow, name)
            if row is None:
                raise NotFoundError(self._no_name(name))
            query = (
                select(VersionRow, ProgramRow.meta)
                .join(ProgramRow, ProgramRow.id == VersionRow.program_id)
                .where(VersionRow.name == name)
                .order_by(VersionRow.version)
            )
            return [self._info(v, meta, row.deployed_version) for v, meta in s.execute(query)]

    def show(self, spec: str) -> VersionInfo:
        """The version ``spec`` names (``NAME`` is the deployed one, ``NAME@V`` a given one)."""
        with self._read() as s:
            name, version, row = self._resolve(s, spec)
            vrow = self._version_row(s, row, version)
            prow = s.get(ProgramRow, vrow.program_id)
            assert prow is not None
            return self._info(vrow, prow.meta, row.deployed_version)

    def get(self, spec: str) -> ProgramRecord:
        """The stored record of the version ``spec`` names."""
        return self._get(spec)[2]

    def load(self, spec: str) -> dspy.Module:
        """The version ``spec`` names as a ready ``dspy.Module`` (``NAME``: the deployed one)."""
        name, version, record = self._get(spec, history=False)  # a load needs no trial history
        where = format_spec(name, version)
        try:
            program = build_program(record)
        except DmiproError as exc:
            bus.emit("dspy.storage.error", operation="load", name=name, version=version, error=str(exc))
            raise StorageError(f"cannot load {where}: {exc}") from exc
        bus.emit(
            "dspy.storage.load", job_id=record.metadata.job_id, name=name, version=version, backend="registry"
        )
        return program

    def history(self, name: str) -> list[Deployment]:
        """Every deploy and rollback of ``name``, oldest first."""
        validate_name(name)
        with self._read() as s:
            if s.get(NameRow, name) is None:
                raise NotFoundError(self._no_name(name))
            rows = s.execute(
                select(DeploymentRow).where(DeploymentRow.name == name).order_by(DeploymentRow.id)
            ).scalars()
            return [deployment_of(r) for r in rows]

    def diff(self, a: str, b: str) -> dict[str, Any]:
        """Instructions and demos per predictor of two versions (``NAME@A``, ``NAME@B``)."""
        name_a, va, ra = self._get(a)
        name_b, vb, rb = self._get(b)
        out = {
            "a": format_spec(name_a, va),
            "b": format_spec(name_b, vb),
            "best_score": {"a": ra.metadata.best_score, "b": rb.metadata.best_score},
        }
        out.update(diff_programs(ra.program, rb.program))
        return out

    # -- internals --------------------------------------------------------------------

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with session_scope(self.url) as s:
            yield s

    def _write(self, fn: Callable[[Session], T]) -> T:
        """Run ``fn`` in a write transaction, retrying when it loses a race with another writer."""
        engine = get_engine(self.url)
        for attempt in range(_ATTEMPTS):
            try:
                with session_scope(self.url) as s:
                    if is_sqlite(str(engine.url)):
                        # Take SQLite's write lock first, so the read-then-write below cannot go stale.
                        s.execute(text("BEGIN IMMEDIATE"))
                    return fn(s)
            except (IntegrityError, OperationalError) as exc:
                if not _transient(exc) or attempt == _ATTEMPTS - 1:
                    raise RegistryError(
                        f"the registry write kept conflicting with other writers: {exc}"
                    ) from exc
                time.sleep(random.uniform(0.01, 0.05) * (2**attempt))
        raise AssertionError("unreachable")

    def _lock(self, s: Session, name: str, *, create: bool) -> NameRow | None:
        if create:
            now = time.time()
            values = {
                "name": name,
                "latest_version": 0,
                "deployed_version": None,
                "created_at": now,
                "updated_at": now,
            }
            dialect = s.get_bind().dialect.name
            if dialect == "postgresql":
                from sqlalchemy.dialects.postgresql import insert as pg_insert

                s.execute(pg_insert(NameRow).values(**values).on_conflict_do_nothing(index_elements=["name"]))
            elif dialect == "sqlite":
                from sqlalchemy.dialects.sqlite import insert as sqlite_insert

                s.execute(
                    sqlite_insert(NameRow).values(**values).on_conflict_do_nothing(index_elements=["name"])
                )
            elif s.get(NameRow, name) is None:
                s.execute(insert(NameRow).values(**values))  # a conflict here is retried by _write
        return s.execute(
            select(NameRow)
            .where(NameRow.name == name)
            .with_for_update()
            .execution_options(populate_existing=True)
        ).scalar_one_or_none()

    def _should_auto_deploy(self, s: Session, row: NameRow, best: float | None, policy: Any) -> bool:
        if not policy.auto_deploy:
            return False
        if row.deployed_version is None:
            return True
        current = s.get(VersionRow, (row.name, row.deployed_version))
        if best is None or current is None or current.best_score is None:
            return False
        gain = best - current.best_score
        return gain > 0 and gain >= policy.deploy_margin

    def _set_deployed(
        self, s: Session, row: NameRow, version: int, action: str, actor: str, now: float
    ) -> Deployment:
        dep = DeploymentRow(
            name=row.name,
            action=action,
            from_version=row.deployed_version,
            to_version=version,
            actor=actor,
            at=now,
        )
        s.add(dep)
        row.deployed_version = version
        row.updated_at = now
        s.flush()
        return deployment_of(dep)

    def _deploy_stack(self, s: Session, name: str) -> list[int]:
        stack: list[int] = []
        rows = s.execute(
            select(DeploymentRow).where(DeploymentRow.name == name).order_by(DeploymentRow.id)
        ).scalars()
        for r in rows:
            if r.action == "rollback":
                if stack:
                    stack.pop()
            elif r.to_version is not None and (not stack or stack[-1] != r.to_version):
                stack.append(r.to_version)
        return stack

    def _version_row(self, s: Session, row: NameRow, version: int) -> VersionRow:
        vrow = s.get(VersionRow, (row.name, version))
        if vrow is None:
            raise NotFoundError(
                f"{row.name!r} has no version {version} "
                + (
                    f"(it has versions 1..{row.latest_version})"
                    if row.latest_version
                    else "(it has no versions)"
                )
            )
        return vrow

    def _resolve(self, s: Session, spec: str) -> tuple[str, int, NameRow]:
        name, version = parse_spec(spec)
        row = s.get(NameRow, name)
        if row is None:
            raise NotFoundError(self._no_name(name))
        if version is None:
            if row.deployed_version is None:
                latest = row.latest_version
                raise NotFoundError(
                    f"nothing of {name!r} is deployed (it has versions 1..{latest}); deploy one with "
                    f"'dmipro registry deploy {name}@{latest}' or ask for a version, as '{name}@N'"
                )
            version = row.deployed_version
        return name, version, row

    def _get(self, spec: str, *, history: bool = True) -> tuple[str, int, ProgramRecord]:
        with self._read() as s:
            name, version, row = self._resolve(s, spec)
            vrow = self._version_row(s, row, version)
            prow = s.get(ProgramRow, vrow.program_id)
            if prow is None:
                raise StorageError(
                    f"{format_spec(name, version)} points at a missing program {vrow.program_id}"
                )
            return name, version, record_from_row(prow, history=history)

    def _info(self, v: VersionRow, meta: dict[str, Any], deployed: int | None) -> VersionInfo:
        return VersionInfo(
            name=v.name,
            version=v.version,
            program_id=v.program_id,
            best_score=v.best_score,
            baseline_score=meta.get("baseline_score"),
            job_id=meta.get("job_id"),
            program_ref=str(meta.get("program_ref", "")),
            created_by=v.created_by,
            created_at=ts(v.created_at),
            deployed=v.version == deployed,
        )

    def _emit_deployed(self, dep: Deployment) -> None:
        bus.emit(
            "dspy.signature.deployed",
            name=dep.name,
            version=dep.to_version,
            previous_version=dep.from_version,
            action=dep.action,
            actor=dep.actor,
        )

    @staticmethod
    def _no_name(name: str) -> str:
        return f"no program named {name!r} in the registry"


# -- the configured registry, as module functions --------------------------------------


def register(
    name: str, record: ProgramRecord | str, *, deploy: bool | None = None, actor: str | None = None
) -> VersionInfo:
    """Register ``record`` as the next version of ``name`` (see :meth:`Registry.register`)."""
    return Registry().register(name, record, deploy=deploy, actor=actor)


def deploy(name: str, version: int, *, actor: str | None = None) -> Deployment | None:
    """Deploy ``name@version`` (see :meth:`Registry.deploy`)."""
    return Registry().deploy(name, version, actor=actor)


def rollback(name: str, *, actor: str | None = None) -> Deployment:
    """Roll ``name`` back to the previously deployed version (see :meth:`Registry.rollback`)."""
    return Registry().rollback(name, actor=actor)


def load(spec: str) -> dspy.Module:
    """The deployed program of ``"name"``, or a given version ``"name@3"``, as a ready ``dspy.Module``."""
    return Registry().load(spec)


def get(spec: str) -> ProgramRecord:
    """The stored record of ``"name"`` (deployed) or ``"name@3"``."""
    return Registry().get(spec)


def show(spec: str) -> VersionInfo:
    """Version details of ``"name"`` (deployed) or ``"name@3"``."""
    return Registry().show(spec)


def list_names() -> list[NameInfo]:
    """Every registered name."""
    return Registry().list_names()


def versions(name: str) -> list[VersionInfo]:
    """Every version of ``name``, oldest first."""
    return Registry().versions(name)


def history(name: str) -> list[Deployment]:
    """Every deploy and rollback of ``name``, oldest first."""
    return Registry().history(name)


def diff(a: str, b: str) -> dict[str, Any]:
    """What changed between two versions (instructions and demos per predictor)."""
    return Registry().diff(a, b)
