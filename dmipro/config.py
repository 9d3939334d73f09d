"""Settings: ``DMIPRO_*`` environment variables over an optional ``dmipro.yaml``.

One :class:`Settings` object holds every knob; :func:`get_settings` builds it once per
process (environment first, then the YAML file, then the defaults in
:mod:`dmipro.defaults`). ``reload_settings()`` rebuilds it, for tests and for workers
that change their environment.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dmipro import defaults
from dmipro.errors import ConfigError

__all__ = ["RegistrySettings", "Settings", "get_settings", "mask_passwords", "reload_settings"]


class RegistrySettings(BaseModel):
    """The ``registry:`` section of ``dmipro.yaml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    auto_deploy: bool = False
    """Deploy a newly registered version when it beats the deployed one by ``deploy_margin``."""
    deploy_margin: float = 0.0
    """Points (0-100 scale) a new version must gain over the deployed one to auto-deploy."""
    auto_rollback: bool = False
    """Roll back a deployed version when the A/B regression check finds it worse than its reference."""


class Settings(BaseModel):
    """Every process-wide setting, with its environment variable in the field description."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    home: Path = Field(default=Path(defaults.DEFAULT_HOME), description="DMIPRO_HOME")
    database_url: str = Field(default="", description="DMIPRO_DATABASE_URL")
    allowed_modules: tuple[str, ...] = Field(
        default=defaults.DEFAULT_ALLOWED_MODULES, description="DMIPRO_ALLOWED_MODULES"
    )
    broker_url: str = Field(default=defaults.DEFAULT_BROKER_URL, description="DMIPRO_BROKER_URL")
    result_backend: str = Field(default=defaults.DEFAULT_RESULT_BACKEND, description="DMIPRO_RESULT_BACKEND")
    subscribers: tuple[str, ...] = Field(default=(), description="DMIPRO_SUBSCRIBERS")
    capture_text: bool = Field(default=False, description="DMIPRO_CAPTURE_TEXT")
    storage: str = Field(default="db", description="DMIPRO_STORAGE: 'db' or a directory path")
    allow_sqlite_remote: bool = Field(default=False, description="DMIPRO_ALLOW_SQLITE_REMOTE")
    registry: RegistrySettings = Field(default_factory=RegistrySettings)
    allowed_key_envs: tuple[str, ...] = Field(
        default=defaults.DEFAULT_ALLOWED_KEY_ENVS, description="DMIPRO_ALLOWED_KEY_ENVS"
    )
    """Variables a job may name as ``api_key_env`` (shell-style patterns); the rest are refused."""
    allowed_api_hosts: tuple[str, ...] = Field(default=(), description="DMIPRO_ALLOWED_API_HOSTS")
    """Hosts (``host`` or ``host:port``, ``*.domain`` patterns) a job run on workers may send LM calls to."""
    data_roots: tuple[Path, ...] = Field(default=(), description="DMIPRO_DATA_ROOTS")
    """Directories beyond the job file's own that dataset paths may point into."""
    max_trials: int = Field(default=defaults.MAX_TRIALS, ge=1, description="DMIPRO_MAX_TRIALS")
    """Most search trials a job may ask for (``num_trials``)."""
    max_candidates: int = Field(default=defaults.MAX_CANDIDATES, ge=1, description="DMIPRO_MAX_CANDIDATES")
    """Most instruction and demo-set candidates per predictor a job may ask for (``num_candidates``)."""
    max_dataset_rows: int = Field(default=defaults.MAX_DATASET_ROWS, ge=1,
                                  description="DMIPRO_MAX_DATASET_ROWS")
    """Most examples in one split of a job."""
    max_payload_bytes: int = Field(default=defaults.MAX_PAYLOAD_BYTES, ge=1024,
                                   description="DMIPRO_MAX_PAYLOAD_BYTES")
    """Largest job (spec with its datasets, as JSON) stored and sent to workers."""
    code_paths: tuple[Path, ...] = Field(default=(), description="DMIPRO_CODE_PATHS")
    """Directories (besides installed packages and the current directory) programs are imported from."""
    reconcile_interval: float = Field(
        default=defaults.DEFAULT_RECONCILE_INTERVAL_S, ge=0, description="DMIPRO_RECONCILE_INTERVAL"
    )
    reconcile_grace: float = Field(default=defaults.DEFAULT_RECONCILE_GRACE_S, ge=0,
                                   description="DMIPRO_RECONCILE_GRACE")
    fair_share: bool = Field(default=True, description="DMIPRO_FAIR_SHARE: cap each job's tasks in the "
                             "broker to its fair share of the fleet")
    visibility_timeout: float = Field(default=defaults.VISIBILITY_TIMEOUT_S, gt=0,
                                      description="DMIPRO_VISIBILITY_TIMEOUT")
    """Seconds before the Redis broker hands a message a silent worker holds to another worker."""
    lease_ttl: float | None = Field(default=None, gt=0, description="DMIPRO_LEASE_TTL")
    """Seconds a coordinator's job lease lives without renewal (default: see ``effective_lease_ttl``)."""
    stale_after: float = Field(default=defaults.STALE_AFTER_S, gt=0, description="DMIPRO_STALE_AFTER")
    """A running job whose coordinator has not marked it alive for this long is reported ``stale``."""
    log_level: str = Field(default="INFO", description="DMIPRO_LOG_LEVEL")
    """Level of the ``dmipro`` loggers in worker processes."""
    task_modules: tuple[str, ...] = Field(default=(), description="DMIPRO_TASK_MODULES")
    """Extra modules a worker imports so their task bodies register (each within ``allowed_modules``)."""
    otel_export_file: str = Field(default="", description="DMIPRO_OTEL_EXPORT_FILE")
    """A JSON-lines file (``{pid}`` is replaced) every finished span is also written to."""
    shutdown_grace: float = Field(default=0.0, ge=0, description="DMIPRO_SHUTDOWN_GRACE")
    """Seconds a Celery worker told to stop (SIGTERM) lets its running tasks finish before it gives
    them back to the broker and exits; 0 waits for them however long they take (Celery's warm shutdown)."""

    @field_validator("allowed_modules", "subscribers", "allowed_key_envs", "allowed_api_hosts", "data_roots",
                     "code_paths", "task_modules",
                     mode="before")
    @classmethod
    def _split_csv(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @property
    def effective_lease_ttl(self) -> float:
        """``lease_ttl``, by default the visibility timeout bounded to 2..60 s."""
        if self.lease_ttl is not None:
            return self.lease_ttl
        return max(2.0, min(60.0, self.visibility_timeout))

    @property
    def effective_database_url(self) -> str:
        """The database URL, defaulting to a SQLite file under ``home``."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.home / defaults.DEFAULT_DATABASE_FILE).resolve()}"

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, config_file: Path | None = None) -> Settings:
        """Build settings from ``env`` (default ``os.environ``) over ``config_file``."""
        env = os.environ if env is None else env
        path = config_file or Path(env.get("DMIPRO_CONFIG", defaults.CONFIG_FILE))
        values: dict[str, Any] = {}
        if path.is_file():
            try:
                loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: not valid YAML ({_first_line(exc)})") from exc
            if loaded is not None and not isinstance(loaded, dict):
                raise ConfigError(f"{path}: expected a mapping of settings at the top level")
            values.update(loaded or {})
        for name in cls.model_fields:
            key = f"DMIPRO_{name.upper()}"
            if key in env and not (env[key] == "" and name in _BLANK_IS_DEFAULT):
                values[name] = env[key]
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise ConfigError(
                f"setting {where}: {err['msg']} (from {path} or DMIPRO_{where.upper()})"
            ) from exc


_BLANK_IS_DEFAULT = frozenset({"visibility_timeout", "lease_ttl", "stale_after", "log_level",
                               "shutdown_grace"})
"""Settings an empty environment variable leaves at their default (``DMIPRO_LEASE_TTL=``)."""

_URL_CREDENTIALS = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:@/\s'\"]*):[^\s'\"]*@")


def mask_passwords(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` URL in it replaced by ``***``.

    Greedy up to the last ``@``, so a password holding ``@`` (an unparsable URL) is masked whole.
    """
    return _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


_lock = threading.Lock()
_settings: Settings | None = None


def get_settings() -> Settings:
    """The process's settings, built on first use."""
    global _settings
    with _lock:
        if _settings is None:
            _settings = Settings.load()
        return _settings


def reload_settings() -> Settings:
    """Forget the cached settings and build them again from the environment."""
    global _settings
    with _lock:
        _settings = None
    return get_settings()
