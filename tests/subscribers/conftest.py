"""Fixtures for the subscriber suites: no exporter reaches the network, and every test starts clean.

``quiet_otel``, ``recorded_events`` and ``fake_langfuse`` live in ``_support`` (a pytest plugin,
see tests/conftest.py).
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _quiet(quiet_otel: None) -> None:
    """Every subscriber test runs with OTLP export off and subscribers switched off after it."""


@pytest.fixture
def owned_provider() -> None:
    """Skip when another test made a tracer provider of its own global (then dmipro leaves export to it)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    from dmipro.subscribers import _otel_sdk

    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider) and current not in _otel_sdk._owned_providers:
        pytest.skip("the global tracer provider was set by another test, so OTEL_* export is its own")
