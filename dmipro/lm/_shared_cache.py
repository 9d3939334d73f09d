"""A response cache shared by every worker, in Redis, opt-in per LM (``lm.cache: shared``).

DSPy caches LM responses per process (memory, then disk). Workers on other machines, or
the many processes of one fleet, each pay for the same prompt. With ``cache: shared`` a
job's LM looks the response up in Redis first, under *DSPy's own cache key*
(``dspy.cache.cache_key`` of the request DSPy builds, ignoring ``api_key``, ``api_base``
and ``base_url`` as DSPy does), so a response cached by one worker serves every other.

In-flight deduplication: the first worker to miss a key takes a short lock on it
(``SET NX`` with a TTL); another worker missing the same key meanwhile waits for the
response instead of calling the LM too. If the caller fails, its lock is released at once
(or expires after ``lock_ttl_s``) and a waiter makes the call itself.

Only JSON data is shared (the rule for everything on the wire); a response DSPy stores in
another form (litellm's objects on its compatibility path) stays in the local cache and
is counted as ``unshareable``. Per job, Redis counts ``hits``, ``misses``, ``deduplicated``
(waited for another worker's call) and ``errors`` (Redis unreachable: the call goes to the
LM, nothing is lost); :func:`shared_cache_stats` reads them.

How the route is chosen: the process's ``dspy.cache`` is wrapped once by
:class:`RoutingCache`; a job LM marked shared (:func:`share_cache`) sets a context variable
while it runs a call, and only calls made under it go to Redis. Every other LM in the
process keeps DSPy's local cache.
"""

from __future__ import annotations

import contextvars
import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from dmipro import defaults
from dmipro._imports import try_import

__all__ = ["RoutingCache", "SharedCache", "share_cache", "shared_cache_stats"]

log = logging.getLogger(__name__)

PREFIX = "dmipro:lmcache:"
"""Redis keys: ``<prefix>r:<dspy key>`` responses, ``<prefix>l:<dspy key>`` in-flight locks,
``<prefix>stats:<job>`` per-job counters."""
TTL_S = defaults.SHARED_LM_CACHE_TTL_S
"""Responses expire after a week (a cache, not a store)."""


@dataclass
class _Scope:
    cache: SharedCache
    job_id: str
    held: list[str] = field(default_factory=list)


_scope: contextvars.ContextVar[_Scope | None] = contextvars.ContextVar("dmipro_shared_cache", default=None)


class SharedCache:
    """Responses in Redis under DSPy's keys, with in-flight deduplication. Thread-safe."""

    def __init__(self, client: Any, *, lock_ttl_s: float = 120.0, wait_s: float = 120.0,
                 poll_s: float = 0.01) -> None:
        self.client = client
        self.lock_ttl_s, self.wait_s, self.poll_s = lock_ttl_s, wait_s, poll_s

    def _count(self, job_id: str, what: str) -> None:
        try:
            self.client.hincrby(f"{PREFIX}stats:{job_id}", what, 1)
        except Exception:  # counting must never fail a call
            log.debug("shared LM cache: cannot count %s", what, exc_info=True)

    def get(self, key: str, scope: _Scope) -> Any:
        """The cached response, or None after taking the key's lock (the caller must call and put)."""
        try:
            deadline = time.monotonic() + self.wait_s
            waited = False
            while True:
                raw = self.client.get(f"{PREFIX}r:{key}")
                if raw is not None:
                    self._count(scope.job_id, "deduplicated" if waited else "hits")
                    return json.loads(raw)
                lock = f"{PREFIX}l:{key}"
                if self.client.set(lock, "1", nx=True, px=int(self.lock_ttl_s * 1000)):
                    scope.held.append(lock)
                    self._count(scope.job_id, "misses")
                    return None
                if time.monotonic() > deadline:  # the other caller is stuck: call the LM ourselves
                    self._count(scope.job_id, "misses")
                    return None
                waited = True
                time.sleep(self.poll_s)
        except Exception as exc:
            log.warning("shared LM cache unreachable (%s); calling the LM", exc)
            self._count(scope.job_id, "errors")
            return None

    def put(self, key: str, value: Any, scope: _Scope) -> bool:
        """Store a response and release its lock; False when it is not JSON (kept local only)."""
        lock = f"{PREFIX}l:{key}"
        try:
            try:
                body = json.dumps(value, allow_nan=False)
            except (TypeError, ValueError):
                self._count(scope.job_id, "unshareable")
                return False
            with self.client.pipeline(transaction=False) as pipe:
                pipe.set(f"{PREFIX}r:{key}", body, ex=TTL_S)
                pipe.delete(lock)
                pipe.execute()
            return True
        except Exception as exc:
            log.warning("shared LM cache: cannot store a response (%s)", exc)
            self._count(scope.job_id, "errors")
            return False
        finally:
            if lock in scope.held:
                scope.held.remove(lock)

    def release(self, scope: _Scope) -> None:
        """Drop the locks a failed call still holds, so waiters call the LM at once."""
        held, scope.held[:] = list(scope.held), []
        if held:
            try:
                self.client.delete(*held)
            except Exception:
                log.debug("shared LM cache: cannot release locks", exc_info=True)


class RoutingCache:
    """Stands in for ``dspy.cache``: calls under a shared scope go to Redis, the rest to DSPy's cache."""

    def __init__(self, local: Any) -> None:
        self.local = local

    def __getattr__(self, name: str) -> Any:  # reset_memory_cache, save/load, ...: DSPy's cache
        return getattr(self.local, name)

    def get(self, request: dict[str, Any], ignored_args_for_cache_key: list[str] | None = None) -> Any:
        scope = _scope.get()
        if scope is None:
            return self.local.get(request, ignored_args_for_cache_key)
        key = self.local.cache_key(request, ignored_args_for_cache_key)
        value = scope.cache.get(key, scope)
        if value is not None:
            return value
        value = self.local.get(request, ignored_args_for_cache_key)
        if value is not None:  # known here only: share it (and release the lock just taken)
            scope.cache.put(key, value, scope)
        return value

    def put(self, request: dict[str, Any], value: Any, ignored_args_for_cache_key: list[str] | None = None,
            enable_memory_cache: bool = True) -> None:
        scope = _scope.get()
        if scope is not None:
            scope.cache.put(self.local.cache_key(request, ignored_args_for_cache_key), value, scope)
        self.local.put(request, value, ignored_args_for_cache_key, enable_memory_cache)


_install_lock = threading.Lock()
_caches: dict[str, SharedCache] = {}


def _shared(url: str) -> SharedCache:
    import dspy

    # redis comes with the celery and rq extras; a run without a shared cache never loads it.
    redis = try_import("redis", extra="celery", purpose="the shared LM cache (in redis)")
    with _install_lock:
        if not isinstance(dspy.cache, RoutingCache):
            dspy.cache = RoutingCache(dspy.cache)
        cache = _caches.get(url)
        if cache is None:
            client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
            cache = _caches[url] = SharedCache(client)
        return cache


@contextmanager
def _using(cache: SharedCache, job_id: str) -> Iterator[None]:
    scope = _Scope(cache, job_id)
    token = _scope.set(scope)
    try:
        yield
    except BaseException:
        cache.release(scope)
        raise
    finally:
        _scope.reset(token)


def share_cache(lm: Any, job_id: str, url: str) -> Any:
    """Make ``lm`` (a ``dspy.LM`` with its cache on) look responses up in the Redis at ``url`` first.

    Its calls count into job ``job_id``'s hit rate. Returns ``lm`` (its class becomes a
    subclass that opens the shared scope around each call; copies keep it).
    """
    _shared(url)  # installs the routing cache and connects once per process
    base = type(lm)
    if not getattr(base, "_dmipro_shared", False):
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            with _using(_shared(self._dmipro_cache_url), self._dmipro_cache_job):
                return base.__call__(self, *args, **kwargs)

        async def acall(self: Any, *args: Any, **kwargs: Any) -> Any:
            with _using(_shared(self._dmipro_cache_url), self._dmipro_cache_job):
                return await base.acall(self, *args, **kwargs)

        shared = type(f"Shared{base.__name__}", (base,),
                      {"__call__": call, "acall": acall, "_dmipro_shared": True})
        lm.__class__ = shared
    lm._dmipro_cache_job = job_id
    lm._dmipro_cache_url = url
    return lm


def shared_cache_stats(job_id: str, url: str) -> dict[str, Any]:
    """A job's shared-cache counters and its hit rate ((hits + deduplicated) / lookups)."""
    redis = try_import("redis", extra="celery", purpose="the shared LM cache (in redis)")
    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        raw = client.hgetall(f"{PREFIX}stats:{job_id}")
    finally:
        client.close()
    stats: dict[str, Any] = {k.decode() if isinstance(k, bytes) else str(k): int(v) for k, v in raw.items()}
    for name in ("hits", "misses", "deduplicated", "errors", "unshareable"):
        stats.setdefault(name, 0)
    lookups = stats["hits"] + stats["misses"] + stats["deduplicated"]
    stats["hit_rate"] = round((stats["hits"] + stats["deduplicated"]) / lookups, 4) if lookups else None
    return stats
