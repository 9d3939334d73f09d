"""Per-process setup of a worker: import path, logging, observability.

Both workers call :func:`setup_worker_process` once per process that runs tasks: the
Celery app from ``worker_process_init`` (prefork and solo pools) or ``worker_init``
(thread pool), the RQ worker before it starts. It is idempotent per process id, so
calling it again — or from a forked child — does the right thing.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading

from dmipro import observability
from dmipro.config import get_settings
from dmipro.errors import RefError
from dmipro.refs import check_allowed, ensure_importable, trusted_code_paths

__all__ = ["LOG_FORMAT", "TASK_MODULES_ENV", "import_task_modules", "setup_worker_process"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"
"""Log line format of worker processes."""

TASK_MODULES_ENV = "DMIPRO_TASK_MODULES"
"""Comma-separated modules of extra task bodies a worker imports (each within the allowlist)."""

_lock = threading.Lock()
_done_pid: int | None = None
log = logging.getLogger(__name__)


def setup_worker_process(*, loglevel: int | str | None = None) -> bool:
    """Prepare this process to run tasks; returns False when it was already done here.

    - the current directory goes on ``sys.path`` (programs and metrics are imported by
      reference, through the allowlist, from the directory the worker was started in);
    - logging is configured unless the host (Celery) already did it;
    - the task modules named in ``DMIPRO_TASK_MODULES`` are imported (:func:`import_task_modules`);
    - ``dmipro.observability.setup_worker()`` switches on the configured subscribers.
    """
    global _done_pid
    with _lock:
        if _done_pid == os.getpid():
            return False
        _done_pid = os.getpid()
    ensure_importable(trusted_code_paths())
    root = logging.getLogger()
    if not root.handlers:
        level = loglevel if loglevel is not None else get_settings().log_level
        logging.basicConfig(level=level.upper() if isinstance(level, str) else level, format=LOG_FORMAT)
    import_task_modules()
    _setup_observability()
    return True


def import_task_modules() -> tuple[str, ...]:
    """Import the modules in ``DMIPRO_TASK_MODULES`` so their ``@task`` bodies register.

    Every task a worker runs must be registered in the worker: dmipro's own are; a project
    that registers more names their modules here. Each must lie within
    ``DMIPRO_ALLOWED_MODULES``. Returns the module names.
    """
    names = get_settings().task_modules
    if names:
        ensure_importable(trusted_code_paths())
    for name in names:
        check_allowed(name, field=TASK_MODULES_ENV)
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise RefError(f"cannot import task module {name!r} ({exc})", field=TASK_MODULES_ENV) from exc
    return names


def _setup_observability() -> None:
    try:
        observability.setup_worker()
    except Exception:  # telemetry must never keep a worker from running tasks
        log.exception("dmipro.observability.setup_worker() failed; running without it")
