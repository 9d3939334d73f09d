"""One rate limit per provider, model and key name, for every thread and process of the fleet.

A :class:`RateLimiter` guards one *key* (``openai:gpt-4o-mini:OPENAI_API_KEY``: provider,
model and the *name* of the variable holding the API key — never the key). Before a
call, :meth:`RateLimiter.acquire` waits until

1. no fleet-wide **cool-down** is running: a 429 with ``Retry-After`` pauses the key for
   every process, not only the one that saw it;
2. the **circuit breaker** is closed: after ``breaker_failures`` transient failures in a
   row (5xx, timeouts, refused connections; 429s are handled by 1 and 4) the key is held
   back for ``breaker_open_s`` (doubling while it keeps failing),
   then one probe call goes through and its success closes it again;
3. the declared **rpm/tpm** buckets have room (token buckets refilling at the declared
   rate, with a one-second burst, so any 60 s window stays under the limit);
4. with ``adaptive`` on and no ``rpm`` declared, this process has fewer calls in flight
   than its **AIMD** cap: halved on each 429, grown by one per cap's worth of successes;
   and when a 429 carries the provider's ``x-ratelimit-limit-*`` headers, that limit is
   adopted as if it had been declared (:meth:`RateLimiter.discover`).

Where state lives is the one thing backends differ in (the hooks ``_take`` and the
cool-down pair): :class:`LocalBackend` keeps it in this process, under a lock;
:class:`RedisBackend` keeps buckets and cool-downs in Redis (a token bucket in one Lua
script, atomic on the server), so every worker process shares them. The AIMD cap and
the breaker are per process by design: each process learns from its own calls, and the
shared cool-down already stops the whole fleet on a 429.

Limiters are cached per process by (backend, key); :func:`limiter_for` returns the one
to use and :func:`health` says which keys are cooling down or have an open breaker.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from dmipro._imports import try_import
from dmipro.errors import LMError, ProviderUnavailableError

__all__ = [
    "LocalBackend",
    "RateLimiter",
    "RedisBackend",
    "health",
    "limiter_for",
    "limiter_key",
    "refuse_key",
    "refusal",
    "reset",
]

log = logging.getLogger(__name__)

_POLL_S = 0.05
_MAX_SLEEP_S = 1.0
_AIMD_START = 64.0
_BREAKER_MAX_OPEN_S = 120.0


def limiter_key(model: str, key_env: str | None, api_base: str | None = None) -> str:
    """``provider:model:key-name`` (and the host for a self-hosted ``api_base``); never a secret."""
    provider, _, name = model.partition("/") if "/" in model else ("openai", "", model)
    key = f"{provider}:{name}:{key_env or '-'}"
    if api_base:
        from urllib.parse import urlsplit

        parts = urlsplit(api_base)
        key += f"@{parts.hostname or api_base}{':' + str(parts.port) if parts.port else ''}"
    return key


class LocalBackend:
    """Buckets and cool-downs in this process (thread-safe)."""

    name = "local"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}
        self._cool: dict[str, float] = {}

    def take(self, bucket: str, rate: float, capacity: float, cost: float) -> float:
        """Take ``cost`` tokens if there are enough; else the seconds until there will be (0: taken)."""
        now = time.monotonic()
        with self._lock:
            tokens, stamp = self._buckets.get(bucket, (capacity, now))
            tokens = min(capacity, tokens + (now - stamp) * rate)
            if tokens >= cost:
                self._buckets[bucket] = (tokens - cost, now)
                return 0.0
            self._buckets[bucket] = (tokens, now)
            return (cost - tokens) / rate

    def cool_down(self, key: str, seconds: float) -> None:
        """Pause ``key`` for ``seconds`` from now (a longer running pause is kept)."""
        until = time.monotonic() + seconds
        with self._lock:
            self._cool[key] = max(self._cool.get(key, 0.0), until)

    def cooling(self, key: str) -> float:
        """Seconds left of ``key``'s cool-down (0: none)."""
        with self._lock:
            return max(0.0, self._cool.get(key, 0.0) - time.monotonic())


_TAKE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or capacity
local ts = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - ts) * rate)
local wait = 0
if tokens >= cost then
  tokens = tokens - cost
else
  wait = (cost - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / rate * 1000) + 60000)
return tostring(wait)
"""

_COOL_LUA = """
local ms = tonumber(ARGV[1])
local left = redis.call('PTTL', KEYS[1])
if left < ms then
  redis.call('SET', KEYS[1], '1', 'PX', ms)
end
return 1
"""


class RedisBackend:
    """Buckets and cool-downs in Redis, shared by every process that uses the same server.

    The bucket is one Lua script (read, refill, take, write) so concurrent takers never
    over-spend; time is Redis's own clock, so workers on machines with skewed clocks agree.
    """

    name = "redis"
    prefix = "dmipro:ratelimit:"

    def __init__(self, url: str) -> None:
        # redis comes with the celery and rq extras; a thread-pool run never loads it.
        redis = try_import("redis", extra="celery", purpose="a shared rate limit (in redis)")
        self.url = url
        self.client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self._take = self.client.register_script(_TAKE_LUA)
        self._cool = self.client.register_script(_COOL_LUA)
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._local = LocalBackend()
        self._warned = 0.0

    def _fallback(self, exc: BaseException) -> LocalBackend:
        """While Redis is unreachable (a restart, a network blip) this process keeps its own
        buckets: the LM call goes on, held to this process's share instead of the fleet's."""
        now = time.monotonic()
        if now - self._warned > 30:
            self._warned = now
            log.warning("shared rate limit unavailable (%s: %s); limiting in this process until "
                        "Redis is back", type(exc).__name__, exc)
        return self._local

    def take(self, bucket: str, rate: float, capacity: float, cost: float) -> float:
        try:
            return float(self._take(keys=[self.prefix + bucket], args=[rate, capacity, cost]))
        except self._errors as exc:
            return self._fallback(exc).take(bucket, rate, capacity, cost)

    def cool_down(self, key: str, seconds: float) -> None:
        try:
            self._cool(keys=[self.prefix + key + ":cool"], args=[max(1, int(seconds * 1000))])
        except self._errors as exc:
            self._fallback(exc).cool_down(key, seconds)

    def cooling(self, key: str) -> float:
        try:
            left = int(self.client.pttl(self.prefix + key + ":cool"))
        except self._errors as exc:
            return self._fallback(exc).cooling(key)
        return left / 1000.0 if left > 0 else 0.0


@dataclass
class _Breaker:
    failures: int = 0
    open_until: float = 0.0
    open_s: float = 0.0
    probing: bool = False


class RateLimiter:
    """Holds calls of one key back to the fleet's limit; see the module docstring.

    Thread-safe. ``acquire`` before a call and exactly one ``release`` after it.
    """

    def __init__(
        self,
        key: str,
        backend: LocalBackend | RedisBackend,
        *,
        rpm: int | None = None,
        tpm: int | None = None,
        adaptive: bool = True,
        breaker_failures: int = 20,
        breaker_open_s: float = 10.0,
    ) -> None:
        self.key = key
        self.backend = backend
        self.rpm, self.tpm = rpm, tpm
        self.adaptive = adaptive
        self.breaker_failures = breaker_failures
        self.breaker_open_s = breaker_open_s
        self._cond = threading.Condition()
        self._inflight = 0
        self._cap = _AIMD_START
        self._last_decrease = 0.0
        self.discovered = False
        self._breaker = _Breaker()

    def configure(self, *, rpm: int | None, tpm: int | None, adaptive: bool,
                  breaker_failures: int, breaker_open_s: float) -> None:
        """Adopt a job's declared limits (the last job to declare one for this key wins)."""
        self.rpm, self.tpm, self.adaptive = rpm, tpm, adaptive
        self.breaker_failures, self.breaker_open_s = breaker_failures, breaker_open_s
        self.discovered = False

    def discover(self, limits: dict[str, int]) -> None:
        """Adopt the limits a provider advertised on a 429 when the job declared none."""
        if not self.adaptive or (self.rpm and not self.discovered):
            return
        rpm, tpm = limits.get("rpm"), limits.get("tpm")
        if rpm and rpm != self.rpm:
            log.info("%s: the provider advertises %d requests/min; the fleet keeps under it", self.key, rpm)
            self.rpm, self.discovered = rpm, True
        if tpm and not self.tpm:
            self.tpm = tpm

    # -- before a call ----------------------------------------------------------------
    def acquire(self, tokens: int = 0, *, deadline: float | None = None) -> float:
        """Wait until a call may go; returns the seconds it was held back (0.0 when it was not).

        Raises :class:`ProviderUnavailableError` when the monotonic ``deadline`` passes first.
        """
        start = time.monotonic()
        held = 0.0  # only time spent held back counts, not the bookkeeping of a free pass
        probe = False
        while True:
            wait, probe = self._gate(probe)
            if wait <= 0:
                wait = self._buckets(tokens)
            if wait <= 0:
                if self._admit():
                    return held
                t0 = time.monotonic()
                with self._cond:  # at the AIMD cap: a release wakes us
                    self._cond.wait(timeout=_MAX_SLEEP_S)
                held += time.monotonic() - t0
                continue
            now = time.monotonic()
            if deadline is not None and now + min(wait, _MAX_SLEEP_S) > deadline:
                raise ProviderUnavailableError(
                    f"{self.key}: still held back after {now - start:.1f}s ({self.describe() or 'limit'}); "
                    "the call's retry deadline passed"
                )
            time.sleep(min(wait, _MAX_SLEEP_S))
            held += time.monotonic() - now

    def _gate(self, probe: bool) -> tuple[float, bool]:
        """Seconds to wait for the cool-down or the open breaker (0: go on), and whether this
        caller holds the breaker's single probe."""
        cooling = self.backend.cooling(self.key)
        if cooling > 0:
            return cooling, probe
        if probe:
            return 0.0, True
        with self._cond:
            b = self._breaker
            now = time.monotonic()
            if b.open_until > now:
                return b.open_until - now, False
            if b.open_until and b.probing:
                return _POLL_S, False  # one probe is out: the others wait for its answer
            if b.open_until:
                b.probing = True
                return 0.0, True
        return 0.0, False

    def _buckets(self, tokens: int) -> float:
        wait = 0.0
        if self.rpm:
            # Refill a little under the limit so that a full one-second burst plus a minute
            # of refill still stays under ``rpm`` in any 60 s window.
            capacity = max(1.0, self.rpm / 60.0)
            rate = max(self.rpm - capacity, 1.0) / 60.0
            wait = self.backend.take(f"{self.key}:rpm", rate, capacity, 1.0)
        if wait <= 0 and self.tpm and tokens:
            capacity = max(1.0, self.tpm / 60.0)
            rate = max(self.tpm - capacity, 1.0) / 60.0
            wait = self.backend.take(f"{self.key}:tpm", rate, capacity, float(min(tokens, capacity)))
        return wait

    def _admit(self) -> bool:
        with self._cond:
            if self.adaptive and not self.rpm and self._inflight >= int(self._cap):
                return False
            self._inflight += 1
            return True

    # -- after a call -----------------------------------------------------------------
    def release(self, *, ok: bool, rate_limited: bool = False, retry_after: float | None = None,
                transient: bool = False) -> bool:
        """Record how the call ended; returns True when this call opened the breaker."""
        opened = False
        if rate_limited and self.adaptive:
            # The provider asked the whole key to wait: the whole fleet waits.
            self.backend.cool_down(self.key, retry_after if retry_after is not None else 0.5)
        with self._cond:
            self._inflight = max(0, self._inflight - 1)
            now = time.monotonic()
            if rate_limited and self.adaptive and now - self._last_decrease >= max(retry_after or 0.0, 1.0):
                # One decrease per round trip, as TCP does: the 429s of calls that were
                # already in flight answer the same overload, not a new one.
                self._cap = max(1.0, min(self._cap, self._inflight + 1) / 2.0)
                self._last_decrease = now
            elif ok:
                self._cap = min(_AIMD_START * 16, self._cap + 1.0 / max(1.0, self._cap))
            b = self._breaker
            if ok:
                b.failures, b.open_until, b.open_s, b.probing = 0, 0.0, 0.0, False
            elif transient and not rate_limited:
                # A 429 is the limiter's business (cool-down, AIMD); the breaker is for a
                # provider that is down: 5xx, timeouts, refused connections.
                b.failures += 1
                if b.probing or (not b.open_until and b.failures >= self.breaker_failures):
                    b.open_s = min(_BREAKER_MAX_OPEN_S, b.open_s * 2 if b.probing else self.breaker_open_s)
                    b.open_until = time.monotonic() + b.open_s
                    b.probing = False
                    opened = True
                    log.warning("%s: %d failures in a row; holding calls back for %.0fs",
                                self.key, b.failures, b.open_s)
            else:
                b.probing = False
            self._cond.notify_all()
        return opened

    # -- reporting ----------------------------------------------------------------------
    @property
    def concurrency_cap(self) -> int:
        """This process's current AIMD cap on calls in flight."""
        return int(self._cap)

    def describe(self) -> str | None:
        """A one-line state for the job status, or None when nothing holds calls back."""
        b = self._breaker
        now = time.monotonic()
        if b.open_until > now or b.probing:
            return (f"circuit open for {self.key} after {b.failures} failures in a row; "
                    f"next try in {max(0.0, b.open_until - now):.0f}s")
        cooling = self.backend.cooling(self.key)
        if cooling > 0:
            return f"{self.key} rate-limited by the provider; paused {cooling:.1f}s"
        return None


_lock = threading.Lock()
_limiters: dict[tuple[str, str], RateLimiter] = {}
_backends: dict[str, LocalBackend | RedisBackend] = {}


def _backend(redis_url: str | None) -> LocalBackend | RedisBackend:
    name = redis_url or "local"
    backend = _backends.get(name)
    if backend is None:
        backend = _backends[name] = RedisBackend(redis_url) if redis_url else LocalBackend()
    return backend


def limiter_for(key: str, config: Any, *, redis_url: str | None = None) -> RateLimiter:
    """This process's limiter for ``key`` (shared through Redis when ``redis_url`` is given).

    ``config`` is a :class:`~dmipro.jobs.spec.RateLimitConfig`.
    """
    with _lock:
        backend = _backend(redis_url)
        limiter = _limiters.get((backend.name + (redis_url or ""), key))
        if limiter is None:
            limiter = _limiters[(backend.name + (redis_url or ""), key)] = RateLimiter(
                key, backend, rpm=config.rpm, tpm=config.tpm, adaptive=config.adaptive,
                breaker_failures=config.breaker_failures, breaker_open_s=config.breaker_open_s,
            )
        else:
            limiter.configure(rpm=config.rpm, tpm=config.tpm, adaptive=config.adaptive,
                              breaker_failures=config.breaker_failures, breaker_open_s=config.breaker_open_s)
        return limiter


def health() -> dict[str, str]:
    """``{key: state}`` for every key of this process that is paused or has an open breaker."""
    with _lock:
        limiters = list(_limiters.values())
    out: dict[str, str] = {}
    for limiter in limiters:
        try:
            state = limiter.describe()
        except Exception:  # a Redis hiccup must not break a status report
            continue
        if state:
            out[limiter.key] = state
    return out


# Keys the provider rejected outright (auth, quota, unknown model), refused in this process
# without asking until their time runs out. Per key, like the limiters, so it lives here.
_refused_lock = threading.Lock()
_refused: dict[str, tuple[float, type[LMError], str, int | None]] = {}


def refuse_key(key: str, error: LMError, seconds: float) -> None:
    """Refuse calls with ``key`` in this process for ``seconds``, raising a copy of ``error``."""
    with _refused_lock:
        _refused[key] = (time.monotonic() + seconds, type(error), str(error), error.status)


def refusal(key: str) -> LMError | None:
    """A fresh copy of the error ``key`` is refused with, or None when it is not (or no longer)."""
    with _refused_lock:
        entry = _refused.get(key)
        if entry is not None and entry[0] < time.monotonic():
            del _refused[key]
            entry = None
    return None if entry is None else entry[1](entry[2], status=entry[3])


def reset() -> None:
    """Forget this process's limiters and refused keys (tests; a worker starting afresh)."""
    with _lock:
        _limiters.clear()
        _backends.clear()
    with _refused_lock:
        _refused.clear()
