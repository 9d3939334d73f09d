"""The task table: name → body taking a JSON payload and returning a JSON result.

It lives in the transport layer, as a broker holds its actors: task bodies
(:mod:`dmipro.tasks`) register into it with :func:`task`, executors look them up by
name and run them with :func:`execute`. A module that ships a task imports the module
of its body (``evaluation`` → ``tasks.evaluate``), so the body is registered wherever
the task can be sent; a worker imports :mod:`dmipro.tasks`, which registers them all.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from dmipro.errors import DecodeError, DmiproError, TaskError
from dmipro.observability import background_task
from dmipro.tracing import attach, span

__all__ = ["TaskFn", "decode_payload", "encode_payload", "execute", "get_task", "task", "task_names"]

def encode_payload(payload: dict[str, Any]) -> str:
    """The payload as JSON text; anything that is not plain JSON is refused."""
    try:
        return json.dumps(payload, allow_nan=False, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"task payload is not JSON-serializable: {exc}") from exc


def decode_payload(body: Any, *, what: str) -> dict[str, Any]:
    """A payload's JSON text as a dict; anything else (or JSON nested too deep) is a DecodeError."""
    try:
        payload = json.loads(body)
    except (TypeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        detail = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise DecodeError(f"{what}: payload is not JSON ({detail})") from None
    if not isinstance(payload, dict):
        raise DecodeError(f"{what}: payload must be a JSON object, not {type(payload).__name__}")
    return payload


TaskFn = Callable[[dict[str, Any]], dict[str, Any]]

_TASKS: dict[str, TaskFn] = {}


def task(name: str) -> Callable[[TaskFn], TaskFn]:
    """Register a task body under ``name``."""

    def register(fn: TaskFn) -> TaskFn:
        if name in _TASKS and _TASKS[name] is not fn:
            raise ValueError(f"task {name!r} is already registered")
        _TASKS[name] = fn
        return fn

    return register


def get_task(name: str) -> TaskFn:
    """The task body registered as ``name``."""
    try:
        return _TASKS[name]
    except KeyError:
        raise TaskError(f"unknown task {name!r}", task=name, error_type="KeyError") from None


def task_names() -> tuple[str, ...]:
    """Every registered task name."""
    return tuple(sorted(_TASKS))


def execute(name: str, body: str) -> dict[str, Any]:
    """Decode ``body``, run task ``name`` on it, and return its result as plain JSON data.

    dmipro's own errors pass through unchanged (a worker refusing a reference stays a
    RefError); anything else becomes a :class:`TaskError` naming the original type.
    """
    fn = get_task(name)
    payload = decode_payload(body, what=f"task {name}")

    try:
        with (
            attach(payload.pop("_trace", None)),
            span(f"dmipro.task.{name}", job_id=payload.get("job")),
            background_task(name),
        ):
            result = fn(payload)
    except DmiproError:
        raise
    except Exception as exc:
        raise TaskError(
            f"task {name} failed: {type(exc).__name__}: {exc}", task=name, error_type=type(exc).__name__
        ) from exc
    try:
        decoded: dict[str, Any] = json.loads(json.dumps(result, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"task {name}: result is not JSON-serializable ({exc})") from exc
    return decoded
