"""A task's error crosses the wire as a JSON record and comes back as the same error."""

from __future__ import annotations

import json

from dmipro.errors import LMAuthError, OptimizationError, RateLimitError, RefError, TaskError
from dmipro.executor_adapters._remote import error_record, remote_error
from dmipro.executor_adapters.celery import _failure as celery_failure


def _round_trip(exc: Exception) -> Exception:
    return remote_error("evaluate_chunk", json.loads(json.dumps(error_record(exc))))


def test_a_ref_error_keeps_its_type_message_and_field() -> None:
    sent = RefError("os.path:join is not in DMIPRO_ALLOWED_MODULES", field="metric")
    back = _round_trip(sent)
    assert type(back) is RefError and str(back) == str(sent)
    assert str(back) == "metric: os.path:join is not in DMIPRO_ALLOWED_MODULES"
    assert back.field == "metric"


def test_an_lm_error_keeps_status_provider_and_retry_after() -> None:
    back = _round_trip(RateLimitError("slow down", retry_after=2.5, status=429, provider="openai"))
    assert type(back) is RateLimitError and str(back) == "slow down"
    assert (back.retry_after, back.status, back.provider) == (2.5, 429, "openai")
    auth = _round_trip(LMAuthError("bad key", status=401))
    assert type(auth) is LMAuthError and auth.status == 401 and auth.retry_after is None


def test_a_task_error_keeps_the_original_type_name() -> None:
    back = _round_trip(TaskError("task evaluate_chunk failed: KeyError: 'job'", task="evaluate_chunk",
                                 error_type="KeyError"))
    assert type(back) is TaskError and back.error_type == "KeyError" and back.task == "evaluate_chunk"


def test_a_foreign_exception_becomes_a_task_error_naming_it() -> None:
    back = _round_trip(ZeroDivisionError("division by zero"))
    assert type(back) is TaskError and back.error_type == "ZeroDivisionError"
    assert "ZeroDivisionError: division by zero" in str(back)


def test_celery_failure_meta_carries_the_record_as_the_second_argument() -> None:
    sent = OptimizationError("the valset has 1 example; MIPROv2 needs at least 2")
    meta = {"exc_type": "OptimizationError", "exc_message": [str(sent), error_record(sent)],
            "exc_module": "dmipro.errors"}
    back = celery_failure("optimize", meta)
    assert type(back) is OptimizationError and str(back) == str(sent)
    # A failure stored by something else still decodes, by its type name and text.
    plain = celery_failure("evaluate_chunk", {"exc_type": "RefError", "exc_message": ["metric: nope"]})
    assert type(plain) is RefError and str(plain) == "metric: nope"
