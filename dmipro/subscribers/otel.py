"""OpenTelemetry: traces of runs and LM calls, and run metrics, exported over OTLP.

:func:`enable` switches on, once per process, what dmipro records:

- an LM-call span per DSPy LM call (``chat <model>``, gen_ai.* attributes, tokens, cache
  hit, cost), a child of whatever dmipro span is current: task, evaluation, trial,
  phase, run;
- metrics: token usage and call duration per model, LM cost, trial duration and
  score, evaluation examples and errors, run outcomes, A/B outcomes and decisions,
  broker queue depth (``dmipro.queue.depth``, see ``_queues.py``);
- each dmipro event as a span event on the current span.

Where it goes — the tracer and meter providers, the ``OTEL_*`` exporters, the
JSON-lines file of ``DMIPRO_OTEL_EXPORT_FILE`` — is wired by ``_otel_sdk.py``; every
exporter scrubs secrets from what it sends and never raises into the run. Prompt and
completion text is recorded only with ``Settings.capture_text``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from dmipro.config import get_settings
from dmipro.events import Event, Subscriber, bus
from dmipro.lm import callbacks
from dmipro.lm.callbacks import LMCall, LMCallListener
from dmipro.subscribers import flat_attributes, scrub_text
from dmipro.subscribers._otel_sdk import (
    DEFAULT_SERVICE_NAME,
    JsonLinesSpanExporter,
    SdkWiring,
    celery_instrumented,
    instrument_celery,
    read_span_file,
    uninstrument_celery,
    wire,
)
from dmipro.subscribers._queues import queue_depths

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

    def __init__(self, *, sdk: SdkWiring, listener: OtelLMListener, subscriber: OtelSubscriber) -> None:
        self.sdk = sdk
        self.listener = listener
        self.subscriber = subscriber
        self.celery_instrumented = False

    def force_flush(self, timeout_millis: int = 10_000) -> None:
        """Export every finished span and metric now."""
        self.sdk.force_flush(timeout_millis)

    def close(self) -> None:
        """Flush, then detach from the bus, DSPy and the tracer provider."""
        bus.remove(self.subscriber)
        callbacks.remove_listener(self.listener)
        self.sdk.close()
        if self.celery_instrumented:
            uninstrument_celery()


def enable(
    *, capture_text: bool = False, span_exporters: Sequence[Any] = (), metric_readers: Sequence[Any] = ()
) -> OtelHandle:
    """Switch OpenTelemetry on in this process; see the module docstring.

    ``span_exporters`` are added to those the environment asks for (batched, scrubbed,
    guarded); ``metric_readers`` likewise (a given reader gets a meter provider of its own).
    """
    sdk = wire(span_exporters=span_exporters, metric_readers=metric_readers,
               export_file=get_settings().otel_export_file)
    instruments = _Instruments(sdk.meter)
    listener = OtelLMListener(sdk.tracer(), instruments, capture_text=capture_text)
    subscriber = OtelSubscriber(instruments, sdk.tracer())
    callbacks.add_listener(listener, capture_text=capture_text or None)
    bus.add(subscriber)
    return OtelHandle(sdk=sdk, listener=listener, subscriber=subscriber)
