"""How an LM call ended, decided in one place.

Every LM call ends as one of four :class:`Outcome` values:

* ``ok``;
* ``transient`` — 429 (not a quota), 5xx, a timeout, a connection refused or reset: the
  same call may succeed later, so it is retried (:mod:`dmipro.lm.retry`);
* ``permanent`` — a rejected or missing key, exhausted billing or quota (OpenAI sends
  that as a 429 with code ``insufficient_quota``), an unknown model, a prompt past the
  context window, a malformed request: retrying wastes time and money, the job fails fast;
* ``format`` — the provider answered but DSPy's adapter could not parse the reply
  (``AdapterParseError``): the model's fault, scored by the metric as DSPy scores it.

:func:`to_lm_error` turns whatever the stack raised — DSPy 3.4's ``LM*Error`` types
(``dspy/utils/exceptions.py``, projected from ``dspy.lm15`` errors by
``dspy/clients/errors.py``), raw ``dspy.lm15`` errors, litellm's exceptions, Python's
own ``TimeoutError``/``ConnectionError`` — into dmipro's :class:`~dmipro.errors.LMError`
tree, carrying ``status``, ``provider`` and ``retry_after``. :func:`error_for_status`
does the same for a bare HTTP status and provider error code.

:class:`FaultCounts` is what a task reports about its calls' failures: ``lm_errors``
(calls that still failed after retrying), ``retries``, ``rate_limited`` (429s seen) and
``rate_limited_wait_s`` (time spent waiting on rate limits: ``Retry-After``, cool-downs,
the limiter), plus the time spent in other backoff and circuit-breaker state.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from dmipro.errors import (
    LMAuthError,
    LMBadRequestError,
    LMConnectionError,
    LMContextLengthError,
    LMError,
    LMModelNotFoundError,
    LMQuotaError,
    LMServerError,
    LMTimeoutError,
    PermanentLMError,
    RateLimitError,
    TransientLMError,
)

__all__ = [
    "FaultCounts",
    "Outcome",
    "classify",
    "error_for_status",
    "to_lm_error",
]


class Outcome(StrEnum):
    """How one LM call ended."""

    OK = "ok"
    TRANSIENT = "transient"
    PERMANENT = "permanent"
    FORMAT = "format"


# Provider error codes that name a class better than the status does (OpenAI, Azure,
# Anthropic). Codes, never message prose: prose changes between API versions.
_CODES: dict[str, type[LMError]] = {
    "insufficient_quota": LMQuotaError,
    "billing_error": LMQuotaError,
    "billing_hard_limit_reached": LMQuotaError,
    "invalid_api_key": LMAuthError,
    "authentication_error": LMAuthError,
    "permission_error": LMAuthError,
    "model_not_found": LMModelNotFoundError,
    "DeploymentNotFound": LMModelNotFoundError,
    "context_length_exceeded": LMContextLengthError,
    "rate_limit_exceeded": RateLimitError,
    "overloaded_error": LMServerError,
}


def error_for_status(status: int | None, code: str | None = None) -> type[LMError]:
    """The error class for an HTTP ``status`` and a provider error ``code``.

    A known code wins (OpenAI's quota is a 429 with ``insufficient_quota``); then the
    status: 429 rate limit; 408 and 504 timeout; other 5xx server; 401/403 auth; 404
    model; 400/413/422 bad request. An unknown status is treated as transient (a
    provider-side problem the next attempt may not have), within the call's deadline.
    """
    if code and code in _CODES:
        return _CODES[code]
    if status is None:
        return TransientLMError
    if status == 429:
        return RateLimitError
    if status in (408, 504):
        return LMTimeoutError
    if status >= 500:
        return LMServerError
    if status in (401, 403):
        return LMAuthError
    if status == 402:
        return LMQuotaError
    if status == 404:
        return LMModelNotFoundError
    if status in (400, 405, 413, 415, 422):
        return LMBadRequestError
    return TransientLMError


def _dspy_classes() -> list[tuple[type[BaseException], type[LMError]]]:
    """DSPy's public LM errors, most specific first (subclasses precede their parents)."""
    from dspy.utils import exceptions as d

    return [
        (d.ContextWindowExceededError, LMContextLengthError),
        (d.LMUnsupportedModelError, LMModelNotFoundError),
        (d.LMAuthError, LMAuthError),
        (d.LMBillingError, LMQuotaError),
        (d.LMRateLimitError, RateLimitError),
        (d.LMTimeoutError, LMTimeoutError),
        (d.LMServerError, LMServerError),
        (d.LMTransportError, LMConnectionError),
        (d.LMLockTimeoutError, TransientLMError),
        (d.LMInvalidRequestError, LMBadRequestError),
        (d.LMNotConfiguredError, LMAuthError),  # no key configured: an auth problem to the user
        (d.LMUnsupportedFeatureError, LMBadRequestError),
        (d.LMConfigurationError, LMBadRequestError),
        (d.LMCollectionLimitError, LMBadRequestError),
        (d.LMStreamAssemblyError, TransientLMError),
    ]


def _canonical(exc: BaseException, model: str | None) -> BaseException:
    """Project raw ``dspy.lm15`` and litellm errors onto DSPy's public types, as DSPy does."""
    from dspy import lm15

    if isinstance(exc, Exception) and type(exc).__module__.startswith("litellm"):
        from dspy.clients.engines.litellm_errors import to_lm15_error

        exc = to_lm15_error(exc, model=model)
    if isinstance(exc, lm15.LM15Error):
        from dspy.clients.errors import wrap_error

        wrapped: BaseException = wrap_error(exc, model=model or "")
        return wrapped
    return exc


def _cause_chain(exc: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def to_lm_error(exc: BaseException, *, model: str | None = None) -> LMError | None:
    """``exc`` as a dmipro :class:`LMError`, or ``None`` when it is not an LM call's failure.

    ``None`` covers a reply the adapter could not parse (``format``: the metric scores
    it) and errors of the program or metric themselves.
    """
    if isinstance(exc, LMError):
        return exc
    from dspy.utils.exceptions import AdapterParseError, DSPyError, LMProviderError, LMUnexpectedError

    if isinstance(exc, AdapterParseError):
        return None
    exc = _canonical(exc, model)
    status = getattr(exc, "status", None)
    status = status if isinstance(status, int) and not isinstance(status, bool) else None
    provider = getattr(exc, "provider", None)
    code = getattr(exc, "provider_code", None)
    retry_after = getattr(exc, "retry_after", None)
    retry_after = float(retry_after) if isinstance(retry_after, (int, float)) and retry_after >= 0 else None
    # The first line: lm15 appends a multi-line "To fix:" advice that does not fit a status line.
    message = (str(getattr(exc, "message", None) or exc).strip().splitlines() or [type(exc).__name__])[0]
    cls: type[LMError] | None = None
    if isinstance(exc, DSPyError):
        if code in _CODES:
            cls = _CODES[str(code)]
        else:
            cls = next((target for source, target in _dspy_classes() if isinstance(exc, source)), None)
        if cls is None and isinstance(exc, LMProviderError):
            cls = error_for_status(status, code)
        if cls is None and isinstance(exc, LMUnexpectedError):
            # An engine failure DSPy could not classify: transient only when the network
            # underneath broke; anything else is a bug retrying will not fix.
            inner = _cause_chain(exc)[1:]
            if any(isinstance(e, (TimeoutError, ConnectionError)) for e in inner):
                cls = LMTimeoutError if any(isinstance(e, TimeoutError) for e in inner) else LMConnectionError
            else:
                cls = PermanentLMError
    elif isinstance(exc, TimeoutError):
        cls = LMTimeoutError
    elif isinstance(exc, ConnectionError):
        cls = LMConnectionError
    if cls is None:
        return None
    error = cls(message, retry_after=retry_after, status=status, provider=provider)
    error.__cause__ = exc
    error.limits = _advertised_limits(exc)
    return error


_LIMIT_HEADERS = {"x-ratelimit-limit-requests": "rpm", "x-ratelimit-limit-tokens": "tpm",
                  "anthropic-ratelimit-requests-limit": "rpm", "anthropic-ratelimit-tokens-limit": "tpm"}


def _advertised_limits(exc: BaseException) -> dict[str, int] | None:
    """The per-minute limits a provider advertised on the failed response, if any.

    Treated as hints: some providers send ``-1`` or ``0`` (Azure), which are ignored.
    """
    for link in _cause_chain(exc):
        # lm15 keeps them as ``rate_limit_headers`` (values are tuples); litellm on the
        # exception or its httpx response.
        headers = (getattr(link, "rate_limit_headers", None) or getattr(link, "headers", None)
                   or getattr(getattr(link, "response", None), "headers", None))
        if not headers or not hasattr(headers, "items"):
            continue
        found: dict[str, int] = {}
        for name, value in headers.items():
            if isinstance(value, (tuple, list)):
                value = value[0] if value else None
            key = _LIMIT_HEADERS.get(str(name).lower())
            try:
                number = int(float(value))
            except (TypeError, ValueError):
                continue
            if key and number > 0:
                found[key] = number
        if found:
            return found
    return None


def classify(exc: BaseException | None) -> Outcome:
    """The :class:`Outcome` of a call that raised ``exc`` (``None``: it succeeded).

    An exception that is not an LM failure at all (the program's or metric's own bug) is
    scored like a ``format`` failure, as DSPy's ``Evaluate`` scores it.
    """
    if exc is None:
        return Outcome.OK
    error = to_lm_error(exc)
    if error is None:
        return Outcome.FORMAT
    return Outcome.PERMANENT if isinstance(error, PermanentLMError) else Outcome.TRANSIENT


@dataclass
class FaultCounts:
    """Failures of LM calls and the time they cost; adds up across tasks, JSON round-trips.

    Thread-safe to ``record_*`` from several threads (a task's program may call its LM
    from a pool).
    """

    lm_errors: int = 0
    retries: int = 0
    rate_limited: int = 0
    rate_limited_wait_s: float = 0.0
    backoff_wait_s: float = 0.0
    circuit_opens: int = 0
    by_class: dict[str, int] = field(default_factory=dict)
    last_error: str | None = None
    permanent: LMError | None = field(default=None, repr=False, compare=False)
    """The first permanent error seen (in process only: not part of the JSON)."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record_failure(self, error: LMError) -> None:
        """One failed attempt (retried or not)."""
        with self._lock:
            name = type(error).__name__
            self.by_class[name] = self.by_class.get(name, 0) + 1
            if isinstance(error, RateLimitError):
                self.rate_limited += 1

    def record_retry(self, wait_s: float, *, rate_limited: bool) -> None:
        with self._lock:
            self.retries += 1
            if rate_limited:
                self.rate_limited_wait_s += wait_s
            else:
                self.backoff_wait_s += wait_s

    def record_wait(self, wait_s: float) -> None:
        """Time a call was held back before it was sent (limiter, cool-down, open breaker)."""
        with self._lock:
            self.rate_limited_wait_s += wait_s

    def record_gave_up(self, error: LMError) -> None:
        """A call that still failed after its retries: an LM error the caller sees."""
        with self._lock:
            self.lm_errors += 1
            self.last_error = f"{type(error).__name__}: {error}"[:300]
            if isinstance(error, PermanentLMError) and self.permanent is None:
                self.permanent = error

    def add(self, other: FaultCounts) -> FaultCounts:
        """Add ``other`` into this one; returns self."""
        with self._lock:
            self.lm_errors += other.lm_errors
            self.retries += other.retries
            self.rate_limited += other.rate_limited
            self.rate_limited_wait_s += other.rate_limited_wait_s
            self.backoff_wait_s += other.backoff_wait_s
            self.circuit_opens += other.circuit_opens
            for name, n in other.by_class.items():
                self.by_class[name] = self.by_class.get(name, 0) + n
            self.last_error = other.last_error or self.last_error
            if self.permanent is None:
                self.permanent = other.permanent
        return self

    def to_json(self) -> dict[str, Any]:
        return {
            "lm_errors": self.lm_errors,
            "retries": self.retries,
            "rate_limited": self.rate_limited,
            "rate_limited_wait_s": round(self.rate_limited_wait_s, 3),
            "backoff_wait_s": round(self.backoff_wait_s, 3),
            "circuit_opens": self.circuit_opens,
            "by_class": dict(sorted(self.by_class.items())),
            "last_error": self.last_error,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> FaultCounts:
        data = data or {}
        return cls(
            lm_errors=int(data.get("lm_errors", 0)),
            retries=int(data.get("retries", 0)),
            rate_limited=int(data.get("rate_limited", 0)),
            rate_limited_wait_s=float(data.get("rate_limited_wait_s", 0.0)),
            backoff_wait_s=float(data.get("backoff_wait_s", 0.0)),
            circuit_opens=int(data.get("circuit_opens", 0)),
            by_class={str(k): int(v) for k, v in (data.get("by_class") or {}).items()},
            last_error=data.get("last_error"),
        )

    def summary(self) -> dict[str, Any]:
        """The three numbers reports show, under their fixed names."""
        return {
            "lm_errors": self.lm_errors,
            "retries": self.retries,
            "rate_limited_wait_s": round(self.rate_limited_wait_s, 3),
        }
