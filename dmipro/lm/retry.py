"""Retries that respect the provider, and the ``dspy.LM`` that uses them.

:class:`GuardedLM` is a ``dspy.LM`` whose every call goes through an :class:`LMGuard`:

1. the key's :class:`~dmipro.lm.ratelimit.RateLimiter` lets the call go (fleet limit,
   cool-down, circuit breaker);
2. the call runs with DSPy's own retries off (``num_retries=0``), so attempts are not
   multiplied by two retry loops;
3. a failure is classified (:mod:`dmipro.lm.faults`): a *transient* one is retried after
   the provider's ``Retry-After`` when it gives one, else after exponential backoff with
   full jitter (tenacity's ``wait_random_exponential``), until the next wait would pass
   the call's deadline; a *permanent* one is raised at once with a message that says
   what to fix, and the key is refused in this process for a minute so a job with a bad
   key stops after a handful of requests; a *format* failure (the adapter could not
   parse the reply) is the model's answer and goes back to DSPy untouched.

Retries, 429s and the time waited are counted into the task's
:class:`~dmipro.lm.faults.FaultCounts` (the ``faults`` of the active
:func:`~dmipro.lm.usage.metered` meter).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar

import dspy
import tenacity

from dmipro.errors import (
    LMAuthError,
    LMContextLengthError,
    LMError,
    LMModelNotFoundError,
    LMQuotaError,
    PermanentLMError,
    RateLimitError,
    TransientLMError,
)
from dmipro.lm.faults import FaultCounts, to_lm_error
from dmipro.lm.ratelimit import RateLimiter, refusal, refuse_key

__all__ = ["GuardedLM", "LMGuard", "current_faults", "process_faults"]

T = TypeVar("T")

_LATCH_S = 60.0
"""How long a key the provider rejected (auth, quota, unknown model) is refused without asking."""

_process_faults = FaultCounts()


def process_faults() -> FaultCounts:
    """Counts of calls made outside any metered task in this process."""
    return _process_faults


def current_faults() -> FaultCounts:
    """The active task's fault counts (its :func:`~dmipro.lm.usage.metered` meter), else the process's."""
    faults = getattr(dspy.settings.usage_tracker, "faults", None)
    return faults if isinstance(faults, FaultCounts) else _process_faults


class _ProviderWait(tenacity.wait.wait_base):
    """The provider's ``Retry-After`` when it sent one, else full-jitter exponential backoff."""

    def __init__(self, initial_s: float, max_s: float, max_retry_after_s: float) -> None:
        self.jitter = tenacity.wait_random_exponential(multiplier=initial_s, max=max_s)
        self.max_retry_after_s = max_retry_after_s

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        hint = getattr(error, "retry_after", None)
        if isinstance(hint, (int, float)) and hint >= 0:
            return min(float(hint), self.max_retry_after_s)
        return float(self.jitter(retry_state))


class LMGuard:
    """The LM boundary for one LM of a job: limiter, classification, retries, explanations.

    Shared by an LM and its ``copy()``s; thread-safe (its state is the limiter's and the
    per-process refused keys, both locked).
    """

    def __init__(self, *, model: str, key_env: str | None, retry: Any, limiter: RateLimiter) -> None:
        self.model = model
        self.key_env = key_env
        self.retry = retry
        self.limiter = limiter

    def run(self, fn: Callable[[], T], tokens: int = 0) -> T:
        """Call ``fn`` (one LM call) under the limiter, retrying transient failures."""
        faults = current_faults()
        self._refuse_if_latched(faults)
        deadline = time.monotonic() + self.retry.deadline_s
        policy = self.retry

        def attempt() -> T:
            waited = self.limiter.acquire(tokens, deadline=deadline)
            if waited > 0:
                faults.record_wait(waited)
            try:
                out = fn()
            except BaseException as exc:
                error = to_lm_error(exc, model=self.model) if isinstance(exc, Exception) else None
                if error is None:  # the provider answered (a format failure) or the caller's own error
                    self.limiter.release(ok=True)
                    raise
                faults.record_failure(error)
                if isinstance(error, RateLimitError) and error.limits:
                    self.limiter.discover(error.limits)
                if self.limiter.release(
                    ok=False,
                    rate_limited=isinstance(error, RateLimitError),
                    retry_after=error.retry_after,
                    transient=isinstance(error, TransientLMError),
                ):
                    faults.add(FaultCounts(circuit_opens=1))
                if isinstance(error, PermanentLMError):
                    error = self._explain(error)
                    self._latch(error)
                raise error from exc
            self.limiter.release(ok=True)
            return out

        def before_sleep(state: tenacity.RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome is not None else None
            faults.record_retry(state.upcoming_sleep, rate_limited=isinstance(error, RateLimitError))

        stop: Any = tenacity.stop_before_delay(policy.deadline_s)
        if policy.max_attempts is not None:
            stop = stop | tenacity.stop_after_attempt(policy.max_attempts)
        retrying = tenacity.Retrying(
            stop=stop,
            wait=_ProviderWait(policy.initial_backoff_s, policy.max_backoff_s, policy.max_retry_after_s),
            retry=tenacity.retry_if_exception_type(TransientLMError),
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            return retrying(attempt)
        except LMError as error:
            faults.record_gave_up(error)
            raise

    # -- permanent errors ---------------------------------------------------------------
    def _explain(self, error: LMError) -> LMError:
        """The same error, with a message that names what to fix (never the key itself)."""
        status = f" ({error.status})" if error.status is not None else ""
        detail = str(error).strip()[:200]
        if isinstance(error, LMAuthError):
            if self.key_env:
                text = f"the provider rejected the API key in ${self.key_env}{status} for model {self.model}"
            else:
                text = (f"the provider rejected the credentials for model {self.model}{status}; "
                        "name the variable that holds the key with api_key_env")
            if error.status is None:  # no key reached the provider at all
                text = f"no usable API key for model {self.model}: {detail}"
        elif isinstance(error, LMQuotaError):
            where = f"the key in ${self.key_env}" if self.key_env else "this key"
            text = f"the provider says the quota or billing of {where} is exhausted{status}: {detail}"
        elif isinstance(error, LMModelNotFoundError):
            text = f"the provider does not serve model {self.model}{status}: {detail}"
        elif isinstance(error, LMContextLengthError):
            text = f"a prompt does not fit the context window of {self.model}{status}: {detail}"
        else:
            text = f"the provider refused a request to {self.model}{status}: {detail}"
        explained = type(error)(
            text, retry_after=error.retry_after, status=error.status, provider=error.provider
        )
        explained.__cause__ = error.__cause__
        return explained

    def _latch(self, error: LMError) -> None:
        # Only what holds for every call with this key: a bad request or an overlong prompt
        # concerns one request, not the key.
        if isinstance(error, (LMAuthError, LMQuotaError, LMModelNotFoundError)):
            refuse_key(self.limiter.key, error, _LATCH_S)

    def _refuse_if_latched(self, faults: FaultCounts) -> None:
        error = refusal(self.limiter.key)
        if error is not None:
            faults.record_failure(error)
            faults.record_gave_up(error)
            raise error


def _estimate_tokens(lm: Any, prompt: Any, messages: Any, kwargs: dict[str, Any]) -> int:
    """A call's tokens for a tpm budget: about four characters per prompt token, plus max_tokens."""
    chars = len(prompt) if isinstance(prompt, str) else 0
    for message in messages or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(str(part.get("text", ""))) for part in content if isinstance(part, dict))
    settings = {**lm.kwargs, **kwargs}
    out = settings.get("max_tokens") or settings.get("max_completion_tokens") or 0
    return chars // 4 + int(out)


class GuardedLM(dspy.LM):  # type: ignore[misc]
    """A ``dspy.LM`` whose calls go through an :class:`LMGuard` (see the module docstring).

    It is a plain ``dspy.LM`` otherwise; its saved state names ``dspy.LM``, so a program
    saved with it loads with plain ``dspy``. ``copy()`` shares the guard.
    """

    _dmipro_guard: LMGuard | None = None

    def __call__(self, prompt: Any = None, *, messages: Any = None, **kwargs: Any) -> Any:
        call = super().__call__
        guard = self._dmipro_guard
        if guard is None:
            return call(prompt, messages=messages, **kwargs)
        return guard.run(lambda: call(prompt, messages=messages, **kwargs),
                         _estimate_tokens(self, prompt, messages, kwargs))

    async def acall(self, prompt: Any = None, *, messages: Any = None, **kwargs: Any) -> Any:
        # The guard sleeps between attempts; a worker thread keeps that off the event loop.
        return await asyncio.to_thread(self.__call__, prompt, messages=messages, **kwargs)

    def dump_state(self) -> dict[str, Any]:
        from dspy.clients.base_lm import LM_CLASS_STATE_KEY

        state: dict[str, Any] = super().dump_state()
        state[LM_CLASS_STATE_KEY] = "dspy.clients.lm.LM"
        return state
