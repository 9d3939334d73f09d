"""Worker processes: the Celery app, the RQ worker, and the setup every worker process runs.

``celery_app`` and ``rq_worker`` import their optional dependencies when loaded; import
them directly (``dmipro.workers.celery_app``), not through this package.
"""

from __future__ import annotations

from dmipro.workers.setup import setup_worker_process

__all__ = ["setup_worker_process"]
