"""What the registry returns: a name, a version, a deployment. Frozen, with ``to_json``."""

from __future__ import annotations

import getpass
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from dmipro.registry._models import DeploymentRow
from dmipro.registry.names import format_spec

__all__ = ["Deployment", "NameInfo", "VersionInfo", "default_actor", "deployment_of", "ts"]


def default_actor() -> str:
    """``user@host`` of this process, recorded as who registered or deployed."""
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"[:200]


def ts(value: float) -> datetime:
    """A stored epoch timestamp as an aware UTC datetime."""
    return datetime.fromtimestamp(value, UTC)


@dataclass(frozen=True)
class NameInfo:
    """A registered name: how many versions it has and which one is deployed."""

    name: str
    latest_version: int
    deployed_version: int | None
    created_at: datetime
    updated_at: datetime

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "name": self.name,
            "latest_version": self.latest_version,
            "deployed_version": self.deployed_version,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }


@dataclass(frozen=True)
class VersionInfo:
    """One version of a name, with the scores and origin of its program."""

    name: str
    version: int
    program_id: str
    best_score: float | None
    baseline_score: float | None
    job_id: str | None
    program_ref: str
    created_by: str
    created_at: datetime
    deployed: bool

    @property
    def spec(self) -> str:
        """``name@version``."""
        return format_spec(self.name, self.version)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "name": self.name,
            "version": self.version,
            "program_id": self.program_id,
            "best_score": self.best_score,
            "baseline_score": self.baseline_score,
            "job_id": self.job_id,
            "program_ref": self.program_ref,
            "created_by": self.created_by,
            "created_at": self.created_at.isoformat(),
            "deployed": self.deployed,
        }


@dataclass(frozen=True)
class Deployment:
    """One change of a name's deployed version (``action`` is ``deploy`` or ``rollback``)."""

    name: str
    action: str
    from_version: int | None
    to_version: int | None
    actor: str
    at: datetime

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "name": self.name,
            "action": self.action,
            "from_version": self.from_version,
            "to_version": self.to_version,
            "actor": self.actor,
            "at": self.at.isoformat(),
        }


def deployment_of(row: DeploymentRow) -> Deployment:
    """The value object of a deployment-history row."""
    return Deployment(row.name, row.action, row.from_version, row.to_version, row.actor, ts(row.at))
