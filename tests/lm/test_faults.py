"""The LM boundary: every failure classified in one place, retried as the provider asks, counted."""

from __future__ import annotations

import os
import time

import httpx
import pytest
from dspy import lm15
from dspy.utils import exceptions as dspy_errors

from dmipro.errors import (
    LMAuthError,
    LMBadRequestError,
    LMConnectionError,
    LMContextLengthError,
    LMModelNotFoundError,
    LMQuotaError,
    LMServerError,
    LMTimeoutError,
    PermanentLMError,
    RateLimitError,
)
from dmipro.jobs.spec import LMConfig, RetryConfig
from dmipro.lm import build_lm
from dmipro.lm.faults import Outcome, classify, error_for_status, to_lm_error
from dmipro.lm.usage import metered

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

QUESTION = "Ava has 12 apples. She buys 5 more apples at the market. How many apples does Ava have now?"


def _response(status: int, body: dict[str, object] | None = None,
              headers: dict[str, str] | None = None) -> httpx.Response:
    request = httpx.Request("POST", "https://api.openai.com/v1/chat/completions")
    return httpx.Response(status, json=body or {}, headers=headers or {}, request=request)


def _litellm(
    name: str, status: int, code: str | None = None, headers: dict[str, str] | None = None
) -> Exception:
    import litellm

    body = {"error": {"message": "x", "type": code or "error", "code": code}}
    response = _response(status, body, headers)
    cls = getattr(litellm, name)
    kwargs: dict[str, object] = {"message": "x", "llm_provider": "openai", "model": "gpt-4o-mini"}
    if name != "APIConnectionError":
        kwargs["response"] = response
    if name in ("RateLimitError", "AuthenticationError", "NotFoundError", "BadRequestError",
                "ContextWindowExceededError", "InternalServerError"):
        kwargs["body"] = body["error"]
    if name == "RateLimitError":
        kwargs["headers"] = headers or {}
    exc: Exception = cls(**kwargs)
    return exc


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        # DSPy 3.4's public LM errors (dspy/utils/exceptions.py)
        (dspy_errors.LMRateLimitError("slow", status=429, retry_after=2.5), RateLimitError),
        (dspy_errors.LMServerError("boom", status=503), LMServerError),
        (dspy_errors.LMTimeoutError("late"), LMTimeoutError),
        (dspy_errors.LMTransportError("reset by peer"), LMConnectionError),
        (dspy_errors.LMAuthError("bad key", status=401), LMAuthError),
        (dspy_errors.LMBillingError("no money", status=429, provider_code="insufficient_quota"),
         LMQuotaError),
        (dspy_errors.LMUnsupportedModelError("gpt-9", status=404), LMModelNotFoundError),
        (dspy_errors.ContextWindowExceededError(model="m"), LMContextLengthError),
        (dspy_errors.LMInvalidRequestError("bad", status=400), LMBadRequestError),
        (dspy_errors.LMNotConfiguredError("no OPENAI_API_KEY"), LMAuthError),
        (dspy_errors.LMProviderError("teapot", status=502), LMServerError),
        # OpenAI's quota travels as a 429: the code decides, not the status
        (dspy_errors.LMRateLimitError("quota", status=429, provider_code="insufficient_quota"), LMQuotaError),
        # raw dspy.lm15 errors, as a custom engine raises them
        (lm15.RateLimitError("429", status=429, retry_after=1.0), RateLimitError),
        (lm15.ServerError("500", status=500), LMServerError),
        (lm15.TimeoutError("504", status=504), LMTimeoutError),
        (lm15.AuthError("401", status=401), LMAuthError),
        (lm15.BillingError("402"), LMQuotaError),
        (lm15.ContextLengthError("too long"), LMContextLengthError),
        # Python's own network errors
        (TimeoutError("read timed out"), LMTimeoutError),
        (ConnectionResetError("reset"), LMConnectionError),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else v.__name__,
)
def test_dspy_and_lm15_errors_map_to_one_class(exc: BaseException, expected: type) -> None:
    error = to_lm_error(exc, model="openai/gpt-4o-mini")
    assert type(error) is expected
    permanent = issubclass(expected, PermanentLMError)
    assert classify(exc) is (Outcome.PERMANENT if permanent else Outcome.TRANSIENT)


def test_errors_carry_status_provider_and_retry_after() -> None:
    error = to_lm_error(dspy_errors.LMRateLimitError("slow", status=429, provider="openai", retry_after=2.5))
    assert isinstance(error, RateLimitError)
    assert (error.status, error.provider, error.retry_after) == (429, "openai", 2.5)


@pytest.mark.parametrize(
    ("name", "status", "code", "expected"),
    [
        ("RateLimitError", 429, "rate_limit_exceeded", RateLimitError),
        ("RateLimitError", 429, "insufficient_quota", LMQuotaError),
        ("AuthenticationError", 401, "invalid_api_key", LMAuthError),
        ("NotFoundError", 404, "model_not_found", LMModelNotFoundError),
        ("BadRequestError", 400, None, LMBadRequestError),
        ("ContextWindowExceededError", 400, "context_length_exceeded", LMContextLengthError),
        ("InternalServerError", 500, None, LMServerError),
        ("Timeout", 408, None, LMTimeoutError),
        ("APIConnectionError", 500, None, LMConnectionError),
    ],
)
def test_litellm_exceptions_map_to_one_class(
    name: str, status: int, code: str | None, expected: type
) -> None:
    error = to_lm_error(_litellm(name, status, code), model="openai/gpt-4o-mini")
    assert type(error) is expected, (name, code, error)


def test_litellm_retry_after_header_is_read() -> None:
    exc = _litellm("RateLimitError", 429, "rate_limit_exceeded", headers={"retry-after": "7"})
    error = to_lm_error(exc)
    assert isinstance(error, RateLimitError) and error.retry_after == 7.0


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (429, None, RateLimitError), (429, "insufficient_quota", LMQuotaError), (500, None, LMServerError),
        (502, None, LMServerError), (503, None, LMServerError), (504, None, LMTimeoutError),
        (408, None, LMTimeoutError), (401, None, LMAuthError), (403, None, LMAuthError),
        (404, None, LMModelNotFoundError), (400, None, LMBadRequestError),
        (400, "context_length_exceeded", LMContextLengthError), (422, None, LMBadRequestError),
    ],
)
def test_http_statuses(status: int, code: str | None, expected: type) -> None:
    assert error_for_status(status, code) is expected


def test_an_unparseable_reply_is_a_format_failure_not_an_lm_error() -> None:
    import dspy

    class QA(dspy.Signature):
        question: str = dspy.InputField()
        answer: str = dspy.OutputField()

    exc = dspy_errors.AdapterParseError("ChatAdapter", QA, "gibberish")
    assert to_lm_error(exc) is None
    assert classify(exc) is Outcome.FORMAT
    assert classify(ValueError("the metric's own bug")) is Outcome.FORMAT
    assert classify(None) is Outcome.OK


# --- retries on the real DSPy path (the in-process simulator behind dspy.LM) -----------------


def _lm(retry: RetryConfig | None = None, **sim: object) -> object:
    config = LMConfig(model="sim/math", temperature=0.0, sim={"seed": 0, **sim}, retry=retry or RetryConfig())
    return build_lm(config)


def test_dspy_retries_are_off_so_attempts_are_not_multiplied() -> None:
    lm = _lm(RetryConfig(max_attempts=2), server_error_rate=1.0)
    assert lm.num_retries == 0  # type: ignore[attr-defined]
    with metered() as meter, pytest.raises(LMServerError):
        lm(QUESTION)  # type: ignore[operator]
    # exactly our two attempts reached the engine (DSPy's default would add three more each)
    assert sum(lm._engine_spec._attempts.values()) == 2  # type: ignore[attr-defined]
    assert meter.faults.retries == 1 and meter.faults.lm_errors == 1


def test_retry_after_is_honoured_until_the_deadline() -> None:
    lm = _lm(RetryConfig(deadline_s=1.0), rate_limit_rate=1.0, retry_after_s=0.2)
    start = time.monotonic()
    with metered() as meter, pytest.raises(RateLimitError) as caught:
        lm(QUESTION)  # type: ignore[operator]
    elapsed = time.monotonic() - start
    assert caught.value.retry_after == 0.2
    # waits of 0.2 s each, and no wait that would pass the 1 s deadline
    assert 0.6 <= elapsed < 1.5
    assert meter.faults.rate_limited == meter.faults.retries + 1
    assert meter.faults.rate_limited_wait_s >= 0.2 * meter.faults.retries - 0.01
    assert meter.faults.lm_errors == 1 and meter.faults.backoff_wait_s == 0


def test_without_retry_after_the_backoff_is_jittered_exponential() -> None:
    lm = _lm(RetryConfig(deadline_s=2.0, initial_backoff_s=0.05, max_backoff_s=0.4), timeout_rate=1.0)
    with metered() as meter, pytest.raises(LMTimeoutError):
        lm(QUESTION)  # type: ignore[operator]
    assert meter.faults.retries >= 4
    assert 0 < meter.faults.backoff_wait_s <= 2.0
    assert meter.faults.rate_limited_wait_s == 0


def test_a_transient_failure_retried_gives_the_clean_answer() -> None:
    fast = RetryConfig(initial_backoff_s=0.01, max_backoff_s=0.05)  # the same retries, without the waits
    clean, flaky = _lm(), _lm(fast, rate_limit_rate=0.7, retry_after_s=0.0, server_error_rate=0.2)
    with metered() as meter:
        answers = [flaky(f"{QUESTION} ({i})") for i in range(10)]  # type: ignore[operator]
    assert answers == [clean(f"{QUESTION} ({i})") for i in range(10)]  # type: ignore[operator]
    assert meter.faults.retries > 0 and meter.faults.lm_errors == 0


def test_a_permanent_error_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    from dmipro.lm._sim import SimEngine

    calls = []

    def reject(self: SimEngine, request: object) -> object:
        calls.append(request)
        raise lm15.AuthError("Incorrect API key provided", status=401, provider="sim")

    monkeypatch.setattr(SimEngine, "complete", reject)
    config = LMConfig(model="sim/math", api_key_env="SIM_TEST_KEY", sim={"seed": 5})
    lm = build_lm(config)
    with metered() as meter:
        for _ in range(3):
            with pytest.raises(LMAuthError, match=r"\$SIM_TEST_KEY \(401\)"):
                lm(QUESTION)
    # one request reached the provider; the key is refused in this process afterwards
    assert len(calls) == 1
    assert meter.faults.retries == 0 and meter.faults.lm_errors == 3
