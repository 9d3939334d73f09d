"""The operator's rules for a job's LMs: which key variables and which endpoints a job may use.

A worker holds provider keys and database credentials in its environment, and a job is
written by whoever may submit. So the job names a key's *variable* and an endpoint, and
the process that builds the LM checks both against its own settings:

- ``api_key_env`` must match ``DMIPRO_ALLOWED_KEY_ENVS`` (default ``*_API_KEY``), so a job
  cannot have ``DMIPRO_DATABASE_URL`` sent as a Bearer token;
- on workers (a job run from the job database), ``api_base`` must be a host in
  ``DMIPRO_ALLOWED_API_HOSTS`` (default: none); an in-process run on the submitter's own
  machine may use any endpoint.

Without ``api_key_env``, :func:`dmipro.lm.build_lm` sends a placeholder key to a job's
``api_base``, never the provider key litellm would otherwise take from the environment.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any
from urllib.parse import urlsplit

from dmipro.config import get_settings
from dmipro.errors import JobSpecError

__all__ = ["check_lm_policy"]


def check_lm_policy(cfg: Any, field: str, *, remote: bool) -> None:
    """Raise :class:`JobSpecError` if LM config ``cfg`` breaks the operator's rules (see module doc)."""
    settings = get_settings()
    if cfg.api_key_env and not any(fnmatchcase(cfg.api_key_env, p) for p in settings.allowed_key_envs):
        raise JobSpecError(
            f"api_key_env {cfg.api_key_env!r} is not a key variable this machine hands to jobs "
            f"(DMIPRO_ALLOWED_KEY_ENVS: {','.join(settings.allowed_key_envs) or '(none)'})",
            field=f"{field}.api_key_env",
        )
    if remote and cfg.api_base:
        parts = urlsplit(cfg.api_base)
        host = (parts.hostname or "").lower()
        names = {host, f"{host}:{parts.port}"} if parts.port else {host}
        if not any(fnmatchcase(n, p.lower()) for n in names for p in settings.allowed_api_hosts):
            raise JobSpecError(
                f"api_base host {host!r} is not one workers may call (DMIPRO_ALLOWED_API_HOSTS: "
                f"{','.join(settings.allowed_api_hosts) or '(none)'}); ask the operator to allow it",
                field=f"{field}.api_base",
            )
