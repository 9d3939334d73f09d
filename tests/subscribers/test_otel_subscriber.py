"""The OpenTelemetry subscriber: LM-call spans adding up to the run's usage, nesting, metrics, export."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import dspy
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from dmipro import observability, tracing
from dmipro.config import Settings, reload_settings
from dmipro.errors import ConfigError
from dmipro.events import Event, bus
from dmipro.lm._sim import AsyncSimEngine, SimEngine, sim_lm
from dmipro.lm.usage import metered
from dmipro.subscribers import _otel_sdk
from tests.subscribers._support import FakeLangfuse, metric_points, run_tiny, tiny_spec

OTEL = Settings(subscribers=("otel",))


def _setup(settings: Settings = OTEL) -> tuple[InMemorySpanExporter, InMemoryMetricReader]:
    exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
    assert observability.setup(settings, span_exporters=[exporter], metric_readers=[reader]) == ("otel",)
    return exporter, reader


def _lm_spans(exporter: InMemorySpanExporter) -> list[Any]:
    observability.flush()
    spans = exporter.get_finished_spans()
    return [s for s in spans if (s.attributes or {}).get("gen_ai.operation.name") == "chat"]


def test_lm_call_spans_add_up_to_the_usage_the_run_reports() -> None:
    exporter, _ = _setup()
    _, summary = run_tiny()
    spans = _lm_spans(exporter)
    billed = [s for s in spans if not s.attributes["dmipro.lm.cache_hit"]]
    assert summary["lm_calls"] > 0
    assert len(billed) == summary["lm_calls"]
    tokens = sum(s.attributes["gen_ai.usage.input_tokens"] + s.attributes["gen_ai.usage.output_tokens"]
                 for s in spans)
    assert tokens == summary["tokens"]
    cost = sum(s.attributes["dmipro.lm.cost_usd"] for s in spans)
    assert math.isclose(cost, summary["cost_usd"], rel_tol=1e-9)
    for s in spans:
        assert s.name == "chat sim/math"
        assert s.attributes["gen_ai.request.model"] == "sim/math"
        assert s.attributes["gen_ai.provider.name"] == "sim"
        assert s.attributes["dmipro.job_id"] == summary["job_id"]


def test_lm_call_spans_add_up_to_an_evaluations_usage() -> None:
    from dmipro.api import evaluate

    exporter, _ = _setup()
    result = evaluate(tiny_spec(), executor="thread")
    spans = _lm_spans(exporter)
    assert len(spans) == result.usage.calls == result.n
    assert sum(s.attributes["gen_ai.usage.input_tokens"] for s in spans) == result.usage.prompt_tokens
    assert sum(s.attributes["gen_ai.usage.output_tokens"] for s in spans) == result.usage.completion_tokens


def test_spans_nest_run_phase_trial_evaluation_task_lm_call() -> None:
    exporter, _ = _setup()
    job_id, _ = run_tiny()
    observability.flush()
    spans = exporter.get_finished_spans()
    by_id = {s.context.span_id: s for s in spans}
    roots = [s for s in spans if s.name == "dmipro.optimize"]
    assert len(roots) == 1 and roots[0].parent is None
    assert roots[0].attributes["dmipro.job_id"] == job_id
    assert {s.context.trace_id for s in spans} == {roots[0].context.trace_id}

    def chain(span: Any) -> list[str]:
        names = []
        while span.parent is not None:
            span = by_id[span.parent.span_id]
            names.append(span.name)
        return names

    chains = Counter(tuple(chain(s)) for s in _lm_spans(exporter))
    evaluation = ("dmipro.task.evaluate_chunk", "dmipro.evaluate", "dmipro.trial", "dmipro.phase.search",
                  "dmipro.optimize")
    bootstrap = ("dmipro.task.bootstrap_demo_set", "dmipro.phase.bootstrap", "dmipro.optimize")
    proposal = ("dmipro.task.propose_instruction", "dmipro.phase.propose", "dmipro.optimize")
    assert chains[evaluation] > 0 and chains[bootstrap] > 0 and chains[proposal] > 0
    assert all(c[-1] == "dmipro.optimize" for c in chains), chains
    for c in chains:
        assert c[0].startswith("dmipro.task."), c


def test_each_event_is_recorded_on_the_span_it_was_emitted_in(recorded_events: list[Event]) -> None:
    exporter, _ = _setup()
    events = recorded_events
    run_tiny()
    observability.flush()
    by_id = {format(s.context.span_id, "016x"): s for s in exporter.get_finished_spans()}
    assert events
    for event in events:
        span = by_id[event.span_id]
        matching = [e for e in span.events if e.attributes.get("dmipro.event_id") == event.event_id]
        assert len(matching) == 1 and matching[0].name == event.name


def test_run_metrics(recorded_events: list[Event]) -> None:
    _, reader = _setup()
    _, summary = run_tiny()
    events = [e for e in recorded_events if e.name == "dspy.optimization.trial_complete"]
    observability.flush()
    metrics = metric_points(reader)
    tokens = metrics["gen_ai.client.token.usage"]
    assert sum(p.sum for p in tokens) == summary["tokens"]
    assert {p.attributes["gen_ai.token.type"] for p in tokens} == {"input", "output"}
    assert sum(p.value for p in metrics["dmipro.lm.calls"]) == summary["lm_calls"]
    assert math.isclose(sum(p.value for p in metrics["dmipro.lm.cost"]), summary["cost_usd"], rel_tol=1e-9)
    assert sum(p.count for p in metrics["dmipro.trial.duration"]) == len(events)
    scores = sum(p.sum for p in metrics["dmipro.trial.score"])
    assert scores == pytest.approx(sum(e.data["score"] for e in events))
    runs = metrics["dmipro.optimization.runs"]
    assert [(p.attributes["dmipro.status"], p.value) for p in runs] == [("succeeded", 1)]
    assert sum(p.value for p in metrics["dmipro.evaluation.examples"]) > 0


def test_unknown_model_has_unknown_cost_not_zero() -> None:
    exporter, _ = _setup()
    engine = SimEngine("math")
    lm = dspy.LM("acme/unknown-model-x", engine=engine, async_engine=AsyncSimEngine(engine), cache=False)
    with metered() as meter, dspy.context(lm=lm):
        dspy.Predict("question -> answer")(question="What is 2 + 3?")
    (span,) = _lm_spans(exporter)
    assert meter.usage.cost_usd is None
    assert span.attributes["dmipro.lm.cost_known"] is False
    assert "dmipro.lm.cost_usd" not in span.attributes
    assert span.attributes["gen_ai.usage.input_tokens"] == meter.usage.prompt_tokens > 0


def test_cache_hits_are_marked_and_cost_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    from dspy.clients.cache import Cache

    memory_only = Cache(enable_disk_cache=False, enable_memory_cache=True, disk_cache_dir=None)
    monkeypatch.setattr(dspy, "cache", memory_only)
    exporter, _ = _setup()
    lm = sim_lm("sim/math", cache=True)
    question = "Ada has 7 apples and buys 5 more. How many apples does Ada have now? (cache test)"
    with metered() as meter, dspy.context(lm=lm):
        for _ in range(2):
            dspy.Predict("question -> answer")(question=question)
    first, second = _lm_spans(exporter)
    assert first.attributes["dmipro.lm.cache_hit"] is False
    assert second.attributes["dmipro.lm.cache_hit"] is True
    assert second.attributes["gen_ai.usage.input_tokens"] == 0
    assert second.attributes["gen_ai.usage.output_tokens"] == 0
    assert meter.usage.calls == 1
    assert first.attributes["gen_ai.usage.input_tokens"] == meter.usage.prompt_tokens


def test_prompt_and_output_text_only_with_capture_text() -> None:
    exporter, _ = _setup()
    with dspy.context(lm=sim_lm()):
        dspy.Predict("question -> answer")(question="What is 2 + 3?")
    (span,) = _lm_spans(exporter)
    assert not any(k in span.attributes for k in ("gen_ai.input.messages", "gen_ai.output.messages"))
    observability.shutdown()

    exporter, _ = _setup(Settings(subscribers=("otel",), capture_text=True))
    with dspy.context(lm=sim_lm()):
        dspy.Predict("question -> answer")(question="What is 2 + 3?")
    (span,) = _lm_spans(exporter)
    assert "What is 2 + 3?" in span.attributes["gen_ai.input.messages"]
    assert "answer" in span.attributes["gen_ai.output.messages"]


def test_json_lines_file_for_spans_from_other_processes(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DMIPRO_OTEL_EXPORT_FILE", str(tmp_path / "spans-{pid}.jsonl"))
    reload_settings()
    observability.setup_worker(OTEL)
    with tracing.span("dmipro.task.evaluate_chunk", job_id="job-1"), dspy.context(lm=sim_lm()):
        dspy.Predict("question -> answer")(question="What is 2 + 3?")
    observability.shutdown()
    (path,) = tmp_path.glob("spans-*.jsonl")
    spans = observability.read_span_file(str(path))
    task = next(s for s in spans if s["name"] == "dmipro.task.evaluate_chunk")
    lm = next(s for s in spans if s["name"] == "chat sim/math")
    assert lm["parent_span_id"] == task["span_id"] and lm["trace_id"] == task["trace_id"]
    assert lm["attributes"]["gen_ai.usage.input_tokens"] > 0
    assert task["attributes"]["dmipro.job_id"] == "job-1"
    assert "service.name" in task["resource"]


@pytest.mark.usefixtures("owned_provider")
def test_otlp_export_follows_the_standard_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeLangfuse() as collector:
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url)
        observability.setup(OTEL)
        with tracing.span("dmipro.task.evaluate_chunk"), dspy.context(lm=sim_lm()):
            dspy.Predict("question -> answer")(question="What is 2 + 3?")
        observability.shutdown()
        requests = collector.calls("POST", "/v1/traces")
        assert requests and all(r.headers["content-type"] == "application/x-protobuf" for r in requests)
        names = {s["name"] for r in requests for rs in r.body["resourceSpans"] for ss in rs["scopeSpans"]
                 for s in ss["spans"]}
        assert names == {"dmipro.task.evaluate_chunk", "chat sim/math"}


def test_service_name_defaults_to_dmipro(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    assert _otel_sdk._resource().attributes["service.name"] == "dmipro"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "math-qa-workers")
    assert _otel_sdk._resource().attributes["service.name"] == "math-qa-workers"


@pytest.mark.usefixtures("owned_provider")
@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc", "pip install opentelemetry-exporter-otlp-proto-grpc"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json", "http/protobuf"),
        ("OTEL_TRACES_EXPORTER", "zipkin", "otlp, console or none"),
    ],
)
def test_bad_otel_environment_is_a_config_error(monkeypatch: pytest.MonkeyPatch, var: str, value: str,
                                                message: str) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv(var, value)
    before = bus.subscribers
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        observability.setup(OTEL)
    assert bus.subscribers == before and observability.enabled() == ()
