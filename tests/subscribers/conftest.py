"""Fixtures for the subscriber suites: no exporter reaches the network, and every test starts clean.

``quiet_otel`` and ``recorded_events`` live in ``_support`` (a pytest plugin, see tests/conftest.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dmipro import observability
from tests.subscribers._support import FakeLangfuse


@pytest.fixture(autouse=True)
def _quiet(quiet_otel: None) -> None:
    """Every subscriber test runs with OTLP export off and subscribers switched off after it."""


@pytest.fixture
def fake_langfuse(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeLangfuse]:
    """A recording Langfuse server, with the SDK's keys and base URL pointing at it."""
    with FakeLangfuse() as fake:
        monkeypatch.setenv("LANGFUSE_PUBLIC_KEY", "pk-lf-dmipro-test")
        monkeypatch.setenv("LANGFUSE_SECRET_KEY", "sk-lf-dmipro-test-secret")
        monkeypatch.setenv("LANGFUSE_BASE_URL", fake.url)
        monkeypatch.setenv("LANGFUSE_TIMEOUT", "2")
        yield fake
        observability.shutdown()
        from langfuse._client.resource_manager import LangfuseResourceManager

        LangfuseResourceManager.reset()


@pytest.fixture
def owned_provider() -> None:
    """Skip when another test made a tracer provider of its own global (then dmipro leaves export to it)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    from dmipro.subscribers import otel

    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider) and current not in otel._owned_providers:
        pytest.skip("the global tracer provider was set by another test, so OTEL_* export is its own")
