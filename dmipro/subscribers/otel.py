"""OpenTelemetry: traces of runs and LM calls, and run metrics, exported over OTLP.

:func:`enable` wires three things, once per process:

- a tracer provider (the process's global one; created with service name
  ``OTEL_SERVICE_NAME``, default ``dmipro``, unless the application already set one),
  exporting through the standard ``OTEL_*`` variables: ``OTEL_TRACES_EXPORTER``
  (``otlp`` default, ``console``, ``none``), ``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL``
  (``http/protobuf`` default, or ``grpc`` with its exporter installed) and
  ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``. ``DMIPRO_OTEL_EXPORT_FILE`` adds a JSON-lines
  file of finished spans (``{pid}`` in the path is replaced by the process id), written
  as each span ends: the way to collect spans from worker processes in tests. When the
  application set its own provider, it owns export: only the file and exporters passed
  in are added.
- an LM-call span per DSPy LM call (``chat <model>``, gen_ai.* attributes, tokens, cache
  hit, cost), a child of whatever dmipro span is current: task, evaluation, trial,
  phase, run;
- metrics through a meter provider (``OTEL_METRICS_EXPORTER``, same values): token
  usage and call duration per model, LM cost, trial duration and score, evaluation
  examples and errors, run outcomes, broker queue depth (``dmipro.queue.depth``, see
  ``_queues.py``); and each dmipro event as a span event on the
  current span.

Every exporter is wrapped so that it scrubs secrets from what it sends and never
raises into the run. Prompt and completion text is recorded only with
``Settings.capture_text``.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dmipro.errors import ConfigError
from dmipro.events import Event, Subscriber, bus
from dmipro.lm import callbacks
from dmipro.lm.callbacks import LMCall, LMCallListener
from dmipro.subscribers import REDACTED as _REDACTED
from dmipro.subscribers import (
    flat_attributes,
    is_secret_key,
    missing_extra,
    scrub_text,
    secret_values,
)

__all__ = [
    "DEFAULT_SERVICE_NAME",
    "JsonLinesSpanExporter",
    "OtelHandle",
    "OtelLMListener",
    "OtelSubscriber",
    "enable",
    "celery_instrumented",
    "instrument_celery",
    "read_span_file",
]

log = logging.getLogger(__name__)

DEFAULT_SERVICE_NAME = "dmipro"
_SCOPE = "dmipro"

_owned_providers: weakref.WeakSet[Any] = weakref.WeakSet()
_owned_meter_providers: weakref.WeakSet[Any] = weakref.WeakSet()
_relays: weakref.WeakKeyDictionary[Any, _Relay] = weakref.WeakKeyDictionary()
_provider_lock = threading.Lock()


def _sdk() -> Any:
    try:
        from opentelemetry.sdk import trace as sdk_trace
    except ImportError as exc:
        raise missing_extra("otel", exc) from exc
    return sdk_trace


def _resource() -> Any:
    """The process's resource: ``OTEL_RESOURCE_ATTRIBUTES``, with service.name defaulting to dmipro."""
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    return Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME") or DEFAULT_SERVICE_NAME})


def _exporter_names(var: str) -> list[str]:
    raw = os.environ.get(var, "otlp")
    names = [n.strip().lower() for n in raw.split(",") if n.strip()]
    for name in names:
        if name not in ("otlp", "console", "none"):
            raise ConfigError(f"{var}={raw!r}: dmipro supports otlp, console or none")
    return [n for n in names if n != "none"]


def _otlp_protocol(signal: str) -> str:
    protocol = (
        os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol not in ("http/protobuf", "grpc"):
        raise ConfigError(
            f"OTLP protocol {protocol!r} is not supported; use http/protobuf (the default) or grpc"
        )
    return protocol


def _otlp_exporter(signal: str) -> Any:
    """The OTLP exporter for ``signal`` ("TRACES" or "METRICS") over the configured protocol."""
    module, cls = {
        "TRACES": ("trace_exporter", "OTLPSpanExporter"),
        "METRICS": ("metric_exporter", "OTLPMetricExporter"),
    }[signal]
    protocol = _otlp_protocol(signal)
    package = "grpc" if protocol == "grpc" else "http"
    try:
        exporter = getattr(
            importlib.import_module(f"opentelemetry.exporter.otlp.proto.{package}.{module}"), cls
        )
    except ImportError as exc:
        if package == "grpc":
            raise ConfigError(
                "OTLP over grpc needs its exporter: pip install opentelemetry-exporter-otlp-proto-grpc "
                "(or use OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf)"
            ) from exc
        raise missing_extra("otel", exc) from exc
    return exporter()


# -- exporters ------------------------------------------------------------------------
# Exporters and the relay are duck-typed to the SDK's interfaces (the SDK checks no base
# class), so this module imports without OpenTelemetry installed.


class JsonLinesSpanExporter:
    """A span exporter appending one JSON object per finished span to ``path``.

    ``{pid}`` in ``path`` becomes the process id. Each batch is one ``write`` to a file
    opened for appending, so several processes may share one file. Read it back with
    :func:`read_span_file`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(str(path).replace("{pid}", str(os.getpid())))
        self._lock = threading.Lock()

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        lines = "".join(json.dumps(_span_dict(s), separators=(",", ":"), default=str) + "\n" for s in spans)
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(lines)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Nothing to release: the file is opened per batch."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _span_dict(span: Any) -> dict[str, Any]:
    ctx = span.get_span_context()
    parent = span.parent
    return {
        "name": span.name,
        "trace_id": format(ctx.trace_id, "032x"),
        "span_id": format(ctx.span_id, "016x"),
        "parent_span_id": format(parent.span_id, "016x") if parent is not None else None,
        "kind": span.kind.name,
        "start_time": span.start_time,
        "end_time": span.end_time,
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
        "events": [
            {"name": e.name, "timestamp": e.timestamp, "attributes": dict(e.attributes or {})}
            for e in span.events
        ],
        "resource": dict(span.resource.attributes) if span.resource is not None else {},
        "pid": os.getpid(),
    }


def read_span_file(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The spans a :class:`JsonLinesSpanExporter` wrote, as dicts (trace and span ids in hex)."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def _clean_attributes(attrs: Any, secrets: tuple[str, ...]) -> tuple[dict[str, Any], bool]:
    out: dict[str, Any] = {}
    changed = False
    for key, value in (attrs or {}).items():
        new = value
        if is_secret_key(key):
            new = _REDACTED
        elif isinstance(value, str):
            new = scrub_text(value, secrets)
        elif isinstance(value, tuple | list) and any(isinstance(v, str) for v in value):
            new = tuple(scrub_text(v, secrets) if isinstance(v, str) else v for v in value)
        changed = changed or new != value
        out[key] = new
    return out, changed


def _clean_span(span: Any, secrets: tuple[str, ...]) -> Any:
    """``span``, or a copy of it with secrets scrubbed from attributes, events and status."""
    from opentelemetry.sdk.trace import Event as SpanEvent
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.trace import Status

    attrs, changed = _clean_attributes(span.attributes, secrets)
    events = []
    for event in span.events:
        ev_attrs, ev_changed = _clean_attributes(event.attributes, secrets)
        changed = changed or ev_changed
        events.append(SpanEvent(event.name, ev_attrs, event.timestamp) if ev_changed else event)
    status = span.status
    if status.description:
        description = scrub_text(status.description, secrets)
        if description != status.description:
            status, changed = Status(status.status_code, description), True
    if not changed:
        return span
    return ReadableSpan(
        name=span.name,
        context=span.get_span_context(),
        parent=span.parent,
        resource=span.resource,
        attributes=attrs,
        events=events,
        links=span.links,
        kind=span.kind,
        status=status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


class _SafeExporter:
    """An exporter behind a guard: secrets scrubbed from what it sends, failures logged, never raised."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self._warned = False

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        try:
            secrets = secret_values()
            return self.inner.export([_clean_span(s, secrets) for s in spans])
        except Exception as exc:
            level = logging.DEBUG if self._warned else logging.WARNING
            self._warned = True
            log.log(
                level,
                "span exporter %s failed (%s); spans dropped, the run goes on",
                type(self.inner).__name__,
                scrub_text(f"{type(exc).__name__}: {exc}"),
            )
            return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        try:
            self.inner.shutdown()
        except Exception:
            log.debug("span exporter shutdown failed", exc_info=True)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        try:
            return bool(self.inner.force_flush(timeout_millis))
        except Exception:
            return False


class _Relay:
    """The one span processor dmipro adds to a tracer provider; the processors behind it can change."""

    def __init__(self) -> None:
        self.processors: tuple[Any, ...] = ()

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        for p in self.processors:
            p.on_start(span, parent_context=parent_context)

    def _on_ending(self, span: Any) -> None:
        for p in self.processors:
            hook = getattr(p, "_on_ending", None)
            if hook is not None:
                hook(span)

    def on_end(self, span: Any) -> None:
        for p in self.processors:
            try:
                p.on_end(span)
            except Exception:
                log.debug("span processor failed", exc_info=True)

    def shutdown(self) -> None:
        for p in self.processors:
            p.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return all(p.force_flush(timeout_millis) for p in self.processors)


def _guarded(exporter: Any) -> Any:
    return _SafeExporter(exporter)


def _relay_for(provider: Any) -> _Relay:
    relay = _relays.get(provider)
    if relay is None:
        relay = _Relay()
        provider.add_span_processor(relay)
        _relays[provider] = relay
    return relay


def _tracer_provider() -> tuple[Any, bool]:
    """The global SDK tracer provider, made by dmipro if the application has none; (provider, owned)."""
    from opentelemetry import trace

    sdk_trace = _sdk()
    with _provider_lock:
        current = trace.get_tracer_provider()
        if isinstance(current, sdk_trace.TracerProvider):
            return current, current in _owned_providers
        provider = sdk_trace.TracerProvider(resource=_resource())
        trace.set_tracer_provider(provider)
        if trace.get_tracer_provider() is not provider:
            log.warning(
                "another OpenTelemetry tracer provider is set; dmipro's spans go to a provider "
                "of their own, without parents from the application's spans"
            )
        _owned_providers.add(provider)
        return provider, True


# -- LM calls -------------------------------------------------------------------------


class _Instruments:
    def __init__(self, meter: Any) -> None:
        self.lm_tokens = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}", description="Tokens per LM call, by token type"
        )
        self.lm_duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s", description="Duration of LM calls"
        )
        self.lm_calls = meter.create_counter("dmipro.lm.calls", unit="{call}", description="LM calls")
        self.lm_cost = meter.create_counter(
            "dmipro.lm.cost", unit="USD", description="LM cost of calls whose model has a known price"
        )
        self.trial_duration = meter.create_histogram(
            "dmipro.trial.duration", unit="s", description="Wall time of a search trial"
        )
        self.trial_score = meter.create_histogram(
            "dmipro.trial.score", unit="1", description="Trial scores (0-100)"
        )
        self.examples = meter.create_counter(
            "dmipro.evaluation.examples", unit="{example}", description="Examples evaluated"
        )
        self.example_errors = meter.create_counter(
            "dmipro.evaluation.errors", unit="{example}", description="Examples that raised"
        )
        self.errors = meter.create_counter(
            "dmipro.errors", unit="{error}", description="Failed runs and storage operations"
        )
        self.runs = meter.create_counter(
            "dmipro.optimization.runs", unit="{run}", description="Finished runs"
        )
        self.run_score = meter.create_histogram(
            "dmipro.optimization.score", unit="1", description="Baseline and best score of finished runs"
        )
        self.ab_outcomes = meter.create_counter(
            "dmipro.ab.outcomes", unit="{outcome}", description="Recorded A/B outcomes, per experiment, arm"
        )
        self.ab_value = meter.create_histogram(
            "dmipro.ab.value", unit="1", description="Recorded A/B outcome values, per experiment and arm"
        )
        self.ab_latency = meter.create_histogram(
            "dmipro.ab.latency", unit="ms", description="Latency recorded with A/B outcomes, per arm"
        )
        self.ab_errors = meter.create_counter(
            "dmipro.ab.errors", unit="{outcome}", description="A/B outcomes recorded as errors, per arm"
        )
        self.ab_decisions = meter.create_counter(
            "dmipro.ab.decisions", unit="{decision}", description="A/B decisions reached"
        )
        self.ab_regressions = meter.create_counter(
            "dmipro.ab.regressions", unit="{regression}", description="Regressions of deployed versions"
        )
        self.queue_depth = meter.create_observable_gauge(
            "dmipro.queue.depth",
            callbacks=[_observe_queues],
            unit="{task}",
            description="Tasks waiting on dmipro's broker queues (Celery and RQ on Redis)",
        )


def _observe_queues(_options: Any) -> list[Any]:
    from opentelemetry.metrics import Observation

    from dmipro.subscribers._queues import queue_depths

    return [Observation(depth, attrs) for attrs, depth in queue_depths()]


class OtelLMListener(LMCallListener):
    """Opens a ``chat <model>`` span per LM call and records token, duration and cost metrics."""

    def __init__(self, tracer: Any, instruments: _Instruments | None, *, capture_text: bool = False) -> None:
        self.tracer = tracer
        self.instruments = instruments
        self.capture_text = capture_text

    def on_start(self, call: LMCall) -> Any:
        from opentelemetry import context, trace

        attrs: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": call.provider,
            "gen_ai.request.model": call.model,
        }
        for key in ("temperature", "max_tokens", "top_p"):
            if isinstance(call.params.get(key), int | float):
                attrs[f"gen_ai.request.{key}"] = call.params[key]
        if call.job_id is not None:
            attrs["dmipro.job_id"] = call.job_id
        if call.trial is not None:
            attrs["dmipro.trial"] = call.trial
        if self.capture_text and call.messages is not None:
            attrs["gen_ai.input.messages"] = scrub_text(call.messages)
        span = self.tracer.start_span(
            f"chat {call.model}", kind=trace.SpanKind.CLIENT, attributes=attrs, start_time=call.start_ns
        )
        token = context.attach(trace.set_span_in_context(span))
        return span, token

    def on_end(self, call: LMCall, state: Any) -> None:
        if state is None:
            self._metrics(call)
            return
        from opentelemetry import context
        from opentelemetry.trace import Status, StatusCode

        span, token = state
        try:
            context.detach(token)
        except Exception:
            log.debug("could not detach the LM-call span context", exc_info=True)
        span.set_attribute("gen_ai.usage.input_tokens", call.input_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", call.output_tokens)
        if call.cached_input_tokens is not None:
            span.set_attribute("gen_ai.usage.cache_read.input_tokens", call.cached_input_tokens)
        span.set_attribute("dmipro.lm.cache_hit", call.cache_hit)
        span.set_attribute("dmipro.lm.cost_known", call.cost_usd is not None)
        if call.cost_usd is not None:
            span.set_attribute("dmipro.lm.cost_usd", call.cost_usd)
        if self.capture_text and call.outputs is not None:
            span.set_attribute("gen_ai.output.messages", scrub_text(call.outputs))
        if call.error_type is not None:
            span.set_attribute("error.type", call.error_type)
            span.set_status(Status(StatusCode.ERROR, scrub_text(call.error or call.error_type)))
        span.end(end_time=call.end_ns)
        self._metrics(call)

    def _metrics(self, call: LMCall) -> None:
        m = self.instruments
        if m is None:
            return
        base = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": call.provider,
            "gen_ai.request.model": call.model,
        }
        if call.error_type is not None:
            base["error.type"] = call.error_type
        m.lm_duration.record(call.duration_s, base)
        if not call.cache_hit:
            m.lm_tokens.record(call.input_tokens, {**base, "gen_ai.token.type": "input"})
            m.lm_tokens.record(call.output_tokens, {**base, "gen_ai.token.type": "output"})
        m.lm_calls.add(
            1,
            {
                **base,
                "dmipro.lm.cache_hit": call.cache_hit,
                "dmipro.lm.cost_known": call.cost_usd is not None,
            },
        )
        if call.cost_usd:
            m.lm_cost.add(call.cost_usd, base)


# -- events ---------------------------------------------------------------------------


class OtelSubscriber(Subscriber):
    """Records run metrics from dmipro events and adds each event to the current span."""

    patterns = ("dspy.*",)

    def __init__(self, instruments: _Instruments | None, tracer: Any = None) -> None:
        self.instruments = instruments
        self.tracer = tracer
        self._lock = threading.Lock()
        self._started: dict[tuple[str | None, int], float] = {}

    def on_event(self, event: Event) -> None:
        if event.name == "dspy.ab.regression":
            self._alert(event)
        else:
            self._span_event(event)
        if event.name.startswith("dspy.ab."):
            self._ab_metrics(event)
            return
        m = self.instruments
        if m is None:
            return
        name, data = event.name, event.data
        if name in ("dspy.optimization.trial_start", "dspy.evaluation.start") and event.trial is not None:
            with self._lock:
                self._started.setdefault((event.job_id, event.trial), time.perf_counter())
        elif name == "dspy.optimization.trial_complete":
            kind = {"kind": str(data.get("kind") or "unknown")}
            with self._lock:
                started = self._started.pop((event.job_id, event.trial or -1), None)
            if started is not None:
                m.trial_duration.record(time.perf_counter() - started, kind)
            if isinstance(data.get("score"), int | float):
                m.trial_score.record(float(data["score"]), kind)
        elif name == "dspy.evaluation.batch_complete":
            attrs = {"dmipro.split": str(data.get("split", ""))}
            m.examples.add(int(data.get("n") or 0) - int(data.get("cached") or 0), attrs)
            if data.get("errors"):
                m.example_errors.add(int(data["errors"]), attrs)
        elif name == "dspy.optimization.complete":
            m.runs.add(1, {"dmipro.status": "succeeded", "dmipro.stop_reason": str(data.get("stop_reason"))})
            for which in ("baseline", "best"):
                value = data.get(f"{which}_score")
                if isinstance(value, int | float):
                    m.run_score.record(float(value), {"dmipro.score": which})
            self._forget(event.job_id)
        elif name == "dspy.optimization.error":
            m.runs.add(1, {"dmipro.status": "failed", "dmipro.stop_reason": "error"})
            m.errors.add(1, {"dmipro.source": "optimization", "error.type": str(data.get("error_type"))})
            self._forget(event.job_id)
        elif name == "dspy.storage.error":
            m.errors.add(1, {"dmipro.source": "storage", "error.type": str(data.get("operation"))})

    def _forget(self, job_id: str | None) -> None:
        with self._lock:
            for key in [k for k in self._started if k[0] == job_id]:
                del self._started[key]

    def _ab_metrics(self, event: Event) -> None:
        m = self.instruments
        if m is None:
            return
        data = event.data
        if event.name == "dspy.ab.outcome":
            attrs = {"dmipro.ab.experiment": str(data.get("experiment") or ""),
                     "dmipro.ab.arm": str(data.get("arm")),
                     "dmipro.ab.program": str(data.get("program")),
                     "dmipro.ab.version": int(data.get("version") or 0)}
            m.ab_outcomes.add(1, attrs)
            if isinstance(data.get("value"), int | float):
                m.ab_value.record(float(data["value"]), attrs)
            if isinstance(data.get("latency_ms"), int | float):
                m.ab_latency.record(float(data["latency_ms"]), attrs)
            if data.get("error"):
                m.ab_errors.add(1, attrs)
        elif event.name == "dspy.ab.decision":
            m.ab_decisions.add(1, {"dmipro.ab.experiment": str(data.get("experiment")),
                                   "dmipro.ab.decision": str(data.get("decision"))})
        elif event.name == "dspy.ab.regression":
            m.ab_regressions.add(1, {"dmipro.ab.program": str(data.get("program")),
                                     "dmipro.ab.version": int(data.get("version") or 0),
                                     "dmipro.ab.action": str(data.get("action"))})

    def _alert(self, event: Event) -> None:
        """A regression is an alert: a span of its own carrying the event, even outside any run."""
        from opentelemetry import trace

        if self.tracer is None or trace.get_current_span().is_recording():
            self._span_event(event)
            return
        with self.tracer.start_as_current_span("dmipro.ab.regression",
                                               attributes=flat_attributes(event.data, "dmipro.data")):
            self._span_event(event)

    @staticmethod
    def _span_event(event: Event) -> None:
        from opentelemetry import trace

        span = trace.get_current_span()
        if not span.is_recording():
            return
        attrs = flat_attributes(event.data, "dmipro.data", max_text=1000)
        attrs["dmipro.event_id"] = event.event_id
        if event.job_id is not None:
            attrs["dmipro.job_id"] = event.job_id
        if event.trial is not None:
            attrs["dmipro.trial"] = event.trial
        span.add_event(event.name, attributes=attrs)


# -- wiring ---------------------------------------------------------------------------


class OtelHandle:
    """What :func:`enable` switched on; ``close()`` flushes and switches it off again."""

    def __init__(
        self,
        *,
        relay: Any,
        processors: list[Any],
        meter_provider: Any,
        listener: OtelLMListener,
        subscriber: OtelSubscriber,
    ) -> None:
        self.relay = relay
        self.processors = processors
        self.meter_provider = meter_provider
        self.listener = listener
        self.subscriber = subscriber
        self.celery_instrumented = False

    def force_flush(self, timeout_millis: int = 10_000) -> None:
        """Export every finished span and metric now."""
        for p in self.processors:
            try:
                p.force_flush(timeout_millis)
            except Exception:
                log.debug("span processor flush failed", exc_info=True)
        if self.meter_provider is not None:
            try:
                self.meter_provider.force_flush(timeout_millis)
            except Exception:
                log.debug("meter provider flush failed", exc_info=True)

    def _is_global_meter_provider(self) -> bool:
        from opentelemetry import metrics

        return metrics.get_meter_provider() is self.meter_provider

    def close(self) -> None:
        """Flush, then detach from the bus, DSPy and the tracer provider."""
        bus.remove(self.subscriber)
        callbacks.remove_listener(self.listener)
        self.force_flush()
        self.relay.processors = tuple(p for p in self.relay.processors if p not in self.processors)
        for p in self.processors:
            try:
                p.shutdown()
            except Exception:
                log.debug("span processor shutdown failed", exc_info=True)
        if self.meter_provider is not None and not self._is_global_meter_provider():
            # The global one stays open: other instrumentation (Celery's) holds meters from it.
            try:
                self.meter_provider.shutdown()
            except Exception:
                log.debug("meter provider shutdown failed", exc_info=True)
        if self.celery_instrumented:
            try:
                from opentelemetry.instrumentation.celery import CeleryInstrumentor

                CeleryInstrumentor().uninstrument()  # type: ignore[no-untyped-call]
            except Exception:
                log.debug("could not uninstrument Celery", exc_info=True)


def _meter_provider(metric_readers: Sequence[Any]) -> tuple[Any, Any]:
    """(meter, provider dmipro owns or None): the application's SDK provider, or one of dmipro's own."""
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader

    current = metrics.get_meter_provider()
    applications = isinstance(current, MeterProvider) and current not in _owned_meter_providers
    if applications and not metric_readers:
        return current.get_meter(_SCOPE), None
    readers = list(metric_readers)
    for name in _exporter_names("OTEL_METRICS_EXPORTER"):
        exporter = _otlp_exporter("METRICS") if name == "otlp" else ConsoleMetricExporter()
        readers.append(PeriodicExportingMetricReader(exporter))
    # A provider per enable(): a closed one cannot be reopened, and only the first can be global.
    provider = MeterProvider(resource=_resource(), metric_readers=readers)
    _owned_meter_providers.add(provider)
    if not isinstance(current, MeterProvider):
        metrics.set_meter_provider(provider)
    return provider.get_meter(_SCOPE), provider


def enable(
    *, capture_text: bool = False, span_exporters: Sequence[Any] = (), metric_readers: Sequence[Any] = ()
) -> OtelHandle:
    """Switch OpenTelemetry on in this process; see the module docstring.

    ``span_exporters`` are added to those the environment asks for (batched, scrubbed,
    guarded); ``metric_readers`` likewise (a given reader gets a meter provider of its own).
    """
    _sdk()
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

    provider, owned = _tracer_provider()
    # Read all configuration before anything starts a thread, so a ConfigError leaves nothing behind.
    batched = [
        _otlp_exporter("TRACES") if name == "otlp" else ConsoleSpanExporter()
        for name in (_exporter_names("OTEL_TRACES_EXPORTER") if owned else [])
    ]
    batched += list(span_exporters)
    path = os.environ.get("DMIPRO_OTEL_EXPORT_FILE")
    meter, meter_provider = _meter_provider(metric_readers)
    processors: list[Any] = [SimpleSpanProcessor(_guarded(JsonLinesSpanExporter(path)))] if path else []
    processors += [BatchSpanProcessor(_guarded(exporter)) for exporter in batched]
    instruments = _Instruments(meter)
    relay = _relay_for(provider)
    relay.processors = (*relay.processors, *processors)
    listener = OtelLMListener(provider.get_tracer(_SCOPE), instruments, capture_text=capture_text)
    subscriber = OtelSubscriber(instruments, provider.get_tracer(_SCOPE))
    callbacks.add_listener(listener, capture_text=capture_text or None)
    bus.add(subscriber)
    return OtelHandle(
        relay=relay,
        processors=processors,
        meter_provider=meter_provider,
        listener=listener,
        subscriber=subscriber,
    )


def celery_instrumented() -> bool:
    """Whether OpenTelemetry's Celery instrumentation is active in this process."""
    try:
        from opentelemetry.instrumentation.celery import CeleryInstrumentor
    except ImportError:
        return False
    return bool(CeleryInstrumentor().is_instrumented_by_opentelemetry)  # type: ignore[no-untyped-call]


def instrument_celery() -> bool:
    """Instrument Celery (publish and run spans, context in message headers) if Celery is installed.

    Returns whether this call switched the instrumentation on (False: no Celery, or it
    was on already). Worker processes get it after the fork (``worker_process_init``);
    the process that sends tasks gets it too.
    """
    import importlib.util

    if importlib.util.find_spec("celery") is None or celery_instrumented():
        return False
    try:
        from opentelemetry.instrumentation.celery import CeleryInstrumentor
    except ImportError as exc:
        raise missing_extra("otel", exc) from exc
    CeleryInstrumentor().instrument()  # type: ignore[no-untyped-call]
    return True
