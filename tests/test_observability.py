"""Switching observability on and off; its guarantees: each event once, no secret out, never in the way."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from dmipro import observability, tracing
from dmipro.config import Settings, reload_settings
from dmipro.errors import ConfigError
from dmipro.events import Event, bus
from dmipro.lm import callbacks
from dmipro.subscribers import KNOWN_SUBSCRIBERS, REDACTED, scrub, scrub_text
from dmipro.subscribers.otel import OtelSubscriber, read_span_file
from tests.subscribers._support import (
    FakeLangfuse,
    iter_strings,
    register_versions,
    run_tiny,
    tiny_spec,
)

pytestmark = pytest.mark.usefixtures("quiet_otel")

REPO = Path(__file__).resolve().parents[1]
SECRET = "sk-dmipro-planted-0123456789abcdef"
TOKEN = "plantedtoken-7f3a9c2e5b1d"



def _langfuse_env(monkeypatch: pytest.MonkeyPatch, fake: FakeLangfuse) -> None:
    monkeypatch.setenv("LANGFUSE_PUBLIC_KEY", "pk-lf-dmipro-test")
    monkeypatch.setenv("LANGFUSE_SECRET_KEY", "sk-lf-dmipro-test-secret")
    monkeypatch.setenv("LANGFUSE_BASE_URL", fake.url)
    monkeypatch.setenv("LANGFUSE_TIMEOUT", "1")


def _reset_langfuse() -> None:
    from langfuse._client.resource_manager import LangfuseResourceManager

    LangfuseResourceManager.reset()


# -- configuration ----------------------------------------------------------------------


def test_nothing_configured_is_a_cheap_no_op() -> None:
    before = bus.subscribers
    assert observability.setup(Settings()) == ()
    assert observability.setup_worker(Settings()) == ()
    assert bus.subscribers == before
    assert not callbacks.installed() and callbacks.listeners() == ()
    observability.flush()
    observability.shutdown()


def test_setup_reads_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from dmipro.config import reload_settings

    monkeypatch.setenv("DMIPRO_SUBSCRIBERS", "otel")
    reload_settings()
    assert observability.setup() == ("otel",)


def test_unknown_subscriber_names_the_known_ones() -> None:
    with pytest.raises(ConfigError) as err:
        observability.setup(Settings(subscribers=("otel", "datadog")))
    assert "'datadog'" in str(err.value)
    for name in KNOWN_SUBSCRIBERS:
        assert name in str(err.value)
    assert observability.enabled() == ()


@pytest.mark.parametrize(
    ("name", "module"),
    [("otel", "opentelemetry.sdk"), ("langfuse", "langfuse"), ("newrelic", "newrelic.agent")],
)
def test_missing_library_names_the_extra(monkeypatch: pytest.MonkeyPatch, name: str, module: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes the import fail
    monkeypatch.setenv("LANGFUSE_PUBLIC_KEY", "pk-lf-x")
    monkeypatch.setenv("LANGFUSE_SECRET_KEY", "sk-lf-x-secret")
    with pytest.raises(ConfigError, match=rf"pip install 'dmipro\[{name}\]'"):
        observability.setup(Settings(subscribers=(name,)))


def test_newrelic_without_any_configuration_says_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("NEW_RELIC_LICENSE_KEY", "NEW_RELIC_CONFIG_FILE", "NEW_RELIC_DEVELOPER_MODE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match="NEW_RELIC_LICENSE_KEY"):
        observability.setup(Settings(subscribers=("newrelic",)))


def test_setup_is_idempotent() -> None:
    otel_only = Settings(subscribers=("otel", "OTEL"))
    assert observability.setup(otel_only) == ("otel",)
    assert observability.setup(otel_only) == ("otel",)
    assert observability.setup_worker(otel_only) == ("otel",)
    assert sum(isinstance(s, OtelSubscriber) for s in bus.subscribers) == 1
    assert len(callbacks.listeners()) == 1
    observability.shutdown()
    assert not any(isinstance(s, OtelSubscriber) for s in bus.subscribers)
    assert not callbacks.installed()


def test_modules_import_without_the_optional_libraries() -> None:
    script = textwrap.dedent(
        """
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("opentelemetry", "langfuse", "newrelic"):
                    raise ImportError(f"blocked: {name}")
                return None

        sys.meta_path.insert(0, Block())
        import dmipro.observability as obs
        import dmipro.subscribers.langfuse, dmipro.subscribers.newrelic, dmipro.subscribers.otel
        import dmipro.subscribers._otel_sdk, dmipro.subscribers.langfuse_prompts
        import dmipro.lm.callbacks
        from dmipro.config import Settings
        assert obs.setup(Settings()) == ()
        with obs.background_task("t"):
            pass
        try:
            obs.setup(Settings(subscribers=("otel",)))
        except Exception as exc:
            print(type(exc).__name__, exc)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "ConfigError" in proc.stdout and "pip install 'dmipro[otel]'" in proc.stdout


# -- guarantees ---------------------------------------------------------------------------


def test_each_occurrence_of_a_run_is_emitted_and_exported_once(
    monkeypatch: pytest.MonkeyPatch, recorded_events: list[Event]
) -> None:
    events = recorded_events
    exporter = InMemorySpanExporter()
    with FakeLangfuse() as fake:
        _langfuse_env(monkeypatch, fake)
        observability.setup(Settings(subscribers=("otel", "langfuse")), span_exporters=[exporter])
        job_id, summary = run_tiny()
        observability.shutdown()
        _reset_langfuse()

    assert len({e.event_id for e in events}) == len(events)
    names = Counter(e.name for e in events)
    for once in ("dspy.optimization.start", "dspy.optimization.complete",
                 "dspy.optimization.bootstrap_complete", "dspy.optimization.instruction_proposal_complete"):
        assert names[once] == 1, once
    unique_by_trial = ("dspy.optimization.trial_start", "dspy.optimization.trial_complete",
                       "dspy.evaluation.start", "dspy.evaluation.batch_complete")
    keyed = Counter((e.name, e.trial, e.data.get("kind")) for e in events if e.name in unique_by_trial)
    assert keyed and max(keyed.values()) == 1, keyed
    assert all(e.job_id == job_id and e.trace_id for e in events)
    assert len({e.trace_id for e in events}) == 1

    # ...and each subscriber passed each occurrence on once.
    span_events = Counter(ev.attributes["dmipro.event_id"] for s in exporter.get_finished_spans()
                          for ev in s.events)
    assert set(span_events) == {e.event_id for e in events} and max(span_events.values()) == 1
    trials = [e for e in events if e.name == "dspy.optimization.trial_complete"]
    assert len([s for s in fake.scores() if s["name"] == "trial_score"]) == len(trials)
    assert Counter(s["name"] for s in fake.spans())["dmipro.optimize"] == 1
    assert summary["trials"] > 0


def test_no_secret_leaves_the_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                      caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("MY_SERVICE_TOKEN", TOKEN)
    monkeypatch.setenv("DMIPRO_OTEL_EXPORT_FILE", str(tmp_path / "spans.jsonl"))
    reload_settings()
    spec = tiny_spec()
    rows = spec["valset"]
    rows[0] = {**rows[0], "question": f"{rows[0]['question']} (my key is {SECRET}, token {TOKEN})"}
    exporter = InMemorySpanExporter()
    with FakeLangfuse() as fake, caplog.at_level(logging.DEBUG, logger="dmipro"):
        _langfuse_env(monkeypatch, fake)
        settings = Settings(subscribers=("otel", "langfuse"), capture_text=True)
        observability.setup(settings, span_exporters=[exporter])
        job_id, _ = run_tiny(spec)
        register_versions(job_id)
        with tracing.span("dmipro.task.check", api_key=SECRET):
            bus.emit("dspy.storage.error", operation="load", error=f"401 for key {SECRET}",
                     headers={"Authorization": f"Bearer {TOKEN}"}, api_key=SECRET)
        observability.shutdown()
        _reset_langfuse()
        received = fake.dump()

    spans = exporter.get_finished_spans()
    exported = [json.dumps({"attributes": dict(s.attributes or {}), "status": s.status.description,
                            "events": [dict(e.attributes or {}) for e in s.events]}) for s in spans]
    captured = [s.attributes.get("gen_ai.input.messages", "") for s in spans]
    assert any(REDACTED in text for text in captured)  # the secret did reach the exporters, masked
    assert REDACTED in received
    texts = {
        "in-memory spans": "\n".join(exported),
        "span file": json.dumps(read_span_file(tmp_path / "spans.jsonl")),
        "langfuse": received,
        "dmipro logs": "\n".join(r.getMessage() for r in caplog.records),
    }
    for where, text in texts.items():
        assert SECRET not in text, where
        assert TOKEN not in text, where


def test_failing_exporters_never_break_a_run(monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    _, expected = run_tiny()

    class Exploding(InMemorySpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            raise RuntimeError("collector is down")

    with FakeLangfuse(fail_status=401) as fake:
        _langfuse_env(monkeypatch, fake)
        observability.setup(Settings(subscribers=("otel", "langfuse")), span_exporters=[Exploding()])
        _, summary = run_tiny()
        infos = register_versions(summary["job_id"])
        observability.shutdown()
        _reset_langfuse()
        assert fake.requests  # the server was reached, and said no

    same = ("baseline_score", "best_score", "trials", "lm_calls", "tokens", "stop_reason")
    assert {k: summary[k] for k in same} == {k: expected[k] for k in same}
    assert summary["cost_usd"] == pytest.approx(expected["cost_usd"])
    assert [i.version for i in infos] == [1, 2]
    assert "collector is down" in caplog.text


def test_scrub_masks_secret_keys_and_values_but_not_token_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACME_SECRET_KEY", "acme-secret-value-123")
    data = {
        "api_key": "x", "Authorization": "Bearer abcdefghijklmnop", "nested": {"password": "p", "ok": 1},
        "input_tokens": 12, "max_tokens": 100, "api_key_env": "OPENAI_API_KEY",
        "note": "uses acme-secret-value-123 and sk-abcdefghijklmnopqrst",
    }
    out = scrub(data)
    assert out["api_key"] == out["Authorization"] == out["nested"]["password"] == REDACTED
    assert out["nested"]["ok"] == 1 and out["input_tokens"] == 12 and out["max_tokens"] == 100
    assert out["api_key_env"] == "OPENAI_API_KEY"
    assert out["note"] == f"uses {REDACTED} and {REDACTED}"
    assert "abcdefghijklmnop" not in scrub_text("header: Bearer abcdefghijklmnop")
    assert not [s for s in iter_strings(out) if "acme-secret" in s]


def test_setup_worker_instruments_celery() -> None:
    pytest.importorskip("celery")
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    was = CeleryInstrumentor().is_instrumented_by_opentelemetry
    observability.setup_worker(Settings(subscribers=("otel",)))
    assert CeleryInstrumentor().is_instrumented_by_opentelemetry
    observability.shutdown()
    assert CeleryInstrumentor().is_instrumented_by_opentelemetry == was


@pytest.mark.parametrize(
    "module",
    ["dmipro.observability", "dmipro.subscribers.otel", "dmipro.subscribers._otel_sdk",
     "dmipro.subscribers.langfuse", "dmipro.subscribers.langfuse_prompts", "dmipro.subscribers.newrelic",
     "dmipro.lm.callbacks"],
)
def test_each_module_exports_exactly_its_public_members(module: str) -> None:
    import importlib

    from tests.test_public_api import _check_exports

    _check_exports(importlib.import_module(module))


def test_a_failing_subscriber_leaves_none_switched_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "langfuse", None)
    monkeypatch.setenv("LANGFUSE_PUBLIC_KEY", "pk-lf-x")
    monkeypatch.setenv("LANGFUSE_SECRET_KEY", "sk-lf-x-secret")
    with pytest.raises(ConfigError, match="langfuse"):
        observability.setup(Settings(subscribers=("otel", "langfuse")))
    assert observability.enabled() == ()
    assert not any(isinstance(s, OtelSubscriber) for s in bus.subscribers)
    assert not callbacks.installed()
