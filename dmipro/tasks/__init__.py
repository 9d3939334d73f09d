"""Task bodies: JSON payload in, JSON result out; pure and idempotent, so redelivery is safe.

Importing this package registers every task; executors look tasks up by name.
"""

from __future__ import annotations

from dmipro.tasks import bootstrap as _bootstrap  # noqa: F401  (registers the task bodies)
from dmipro.tasks import evaluate as _evaluate  # noqa: F401
from dmipro.tasks import optimize as _optimize  # noqa: F401
from dmipro.tasks import propose as _propose  # noqa: F401
from dmipro.tasks._registry import execute, get_task, task, task_names

__all__ = ["execute", "get_task", "task", "task_names"]
