"""How many tasks wait on dmipro's broker queues: the ``dmipro.queue.depth`` gauge.

Celery's Redis transport keeps a queue as a Redis list named after the queue; RQ keeps
``rq:queue:<name>``. Both are read with ``LLEN`` (constant time). Only a process with a
broker configured explicitly (``DMIPRO_BROKER_URL`` or ``broker_url`` in dmipro.yaml)
observes, so a laptop running jobs on threads never dials a Redis it does not have.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from dmipro import defaults
from dmipro.config import get_settings

__all__ = ["QUEUES", "queue_depths"]

log = logging.getLogger(__name__)

QUEUES = (defaults.COORDINATOR_QUEUE, defaults.WORK_QUEUE)
_clients: dict[str, Any] = {}
_lock = threading.Lock()
_warned: set[str] = set()


def _broker_url() -> str | None:
    url = get_settings().broker_url
    explicit = "DMIPRO_BROKER_URL" in os.environ or url != defaults.DEFAULT_BROKER_URL
    return url if explicit and url.startswith(("redis://", "rediss://", "unix://")) else None


def queue_depths(url: str | None = None) -> list[tuple[dict[str, str], int]]:
    """``(attributes, waiting tasks)`` per queue and broker kind; empty without a Redis broker."""
    url = url or _broker_url()
    if url is None:
        return []
    try:
        import redis  # why: an optional extra (celery, rq); without it there is no queue to read
    except ImportError:
        return []
    try:
        with _lock:
            client = _clients.get(url)
            if client is None:
                client = _clients[url] = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        out = []
        for queue in QUEUES:
            out.append(({"dmipro.queue": queue, "dmipro.broker": "celery"}, int(client.llen(queue))))
            out.append(
                ({"dmipro.queue": queue, "dmipro.broker": "rq"}, int(client.llen(f"rq:queue:{queue}")))
            )
        return out
    except Exception as exc:  # a metric must never break the process that exports it
        level = logging.DEBUG if url in _warned else logging.WARNING
        _warned.add(url)
        log.log(level, "cannot read the broker's queue lengths for dmipro.queue.depth: %s", exc)
        return []
