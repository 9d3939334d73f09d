"""Spans around dmipro's units of work, and trace-context hand-off between processes.

dmipro opens spans for a run, its phases, trials, evaluations and tasks through this
module only. Without the ``otel`` extra (or with no tracer provider configured) every
call is a cheap no-op. ``inject``/``extract`` carry the W3C trace context in a plain
dict, so a task payload or queue metadata can take a run's trace to another process.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["attach", "extract", "inject", "span"]

_TRACER_NAME = "dmipro"


def _otel() -> Any:
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    return trace


@contextmanager
def span(name: str, **attributes: Any) -> Iterator[Any]:
    """A span named ``name`` with ``dmipro.*`` attributes (None values are dropped)."""
    trace = _otel()
    if trace is None:
        yield None
        return
    attrs = {f"dmipro.{k}": v for k, v in attributes.items() if v is not None}
    with trace.get_tracer(_TRACER_NAME).start_as_current_span(name, attributes=attrs) as current:
        yield current


def inject() -> dict[str, str]:
    """The current trace context as W3C headers (empty without OpenTelemetry)."""
    carrier: dict[str, str] = {}
    try:
        from opentelemetry.propagate import inject as otel_inject
    except ImportError:
        return carrier
    otel_inject(carrier)
    return carrier


def extract(carrier: dict[str, str] | None) -> Any:
    """An OpenTelemetry context from W3C headers, or None."""
    if not carrier:
        return None
    try:
        from opentelemetry.propagate import extract as otel_extract
    except ImportError:
        return None
    return otel_extract(carrier)


@contextmanager
def attach(carrier: dict[str, str] | None) -> Iterator[None]:
    """Make the trace context in ``carrier`` current for the block (a task body's parent)."""
    ctx = extract(carrier)
    if ctx is None:
        yield
        return
    from opentelemetry import context

    token = context.attach(ctx)
    try:
        yield
    finally:
        context.detach(token)
