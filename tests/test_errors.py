"""The exception tree: one root, the documented shape, and the data errors carry."""

from __future__ import annotations

import re

import pytest

import dmipro.errors as errors
from dmipro.errors import (
    DmiproError,
    JobSpecError,
    LMError,
    RateLimitError,
    TaskError,
)

ERROR_CLASSES = [getattr(errors, name) for name in errors.__all__]


def _drawn_tree() -> dict[str, str | None]:
    """``{class name: parent name}`` as drawn in the module docstring."""
    parents: dict[str, str | None] = {}
    stack: list[tuple[int, str]] = []
    for line in (errors.__doc__ or "").splitlines():
        match = re.match(r"^(?P<indent>[\s│├└─]*?)(?P<name>[A-Z]\w*Error)\b", line)
        if match is None:
            continue
        depth = len(match["indent"])
        while stack and stack[-1][0] >= depth:
            stack.pop()
        parents[match["name"]] = stack[-1][1] if stack else None
        stack.append((depth, match["name"]))
    return parents


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_every_error_is_a_dmipro_error(cls: type[Exception]) -> None:
    assert issubclass(cls, DmiproError)
    assert cls.__doc__, f"{cls.__name__} has no docstring"


def test_the_docstring_draws_the_real_tree() -> None:
    drawn = _drawn_tree()
    assert set(drawn) == set(errors.__all__)
    for cls in ERROR_CLASSES:
        parent = drawn[cls.__name__]
        if parent is None:
            assert cls is DmiproError
        else:
            assert cls.__bases__[0] is getattr(errors, parent), cls.__name__
            # A second base may only be a builtin type callers already catch (ValueError for DSPy's).
            assert all(b.__module__ == "builtins" for b in cls.__bases__[1:]), cls.__name__


def test_job_spec_errors_name_their_field() -> None:
    exc = errors.DatasetError("the dataset is empty", field="trainset")
    assert isinstance(exc, JobSpecError)
    assert exc.field == "trainset"
    assert str(exc) == "trainset: the dataset is empty"

    nested = errors.RefError("cannot import", field="lm.api_key_env")
    assert nested.field == "lm.api_key_env" and str(nested).startswith("lm.api_key_env: ")

    bare = JobSpecError("not valid YAML")
    assert bare.field is None and str(bare) == "not valid YAML"


def test_lm_errors_carry_the_retry_hint() -> None:
    limited = RateLimitError("slow down", retry_after=1.5)
    assert isinstance(limited, LMError)
    assert limited.retry_after == 1.5
    assert str(limited) == "slow down"
    assert LMError("server error").retry_after is None


def test_task_errors_name_the_task_and_the_original_type() -> None:
    exc = TaskError("task evaluate_chunk failed: KeyError: 'x'", task="evaluate_chunk", error_type="KeyError")
    assert isinstance(exc, errors.ExecutorError)
    assert (exc.task, exc.error_type) == ("evaluate_chunk", "KeyError")


def test_one_except_clause_catches_everything_dmipro_raises() -> None:
    for cls in ERROR_CLASSES:
        with pytest.raises(DmiproError):
            raise cls("boom")
