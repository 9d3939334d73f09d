"""Task bodies: JSON payload in, JSON result out; pure and idempotent, so redelivery is safe.

Each body registers into the transport layer's task table
(:mod:`dmipro.executor_adapters.task_table`) when its module is imported. Importing this
package registers every body, as a worker must; a module that ships one task imports
just that body's module.
"""

from __future__ import annotations

from dmipro.executor_adapters.task_table import execute, get_task, task, task_names
from dmipro.tasks import bootstrap as _bootstrap  # noqa: F401  (registers the task bodies)
from dmipro.tasks import evaluate as _evaluate  # noqa: F401
from dmipro.tasks import propose as _propose  # noqa: F401

__all__ = ["execute", "get_task", "task", "task_names"]
