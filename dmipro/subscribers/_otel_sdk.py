"""OpenTelemetry SDK wiring for the ``otel`` subscriber: resource, exporters, providers.

What :func:`wire` sets up, once per :func:`dmipro.subscribers.otel.enable`:

- the process's global tracer provider (created with service name ``OTEL_SERVICE_NAME``,
  default ``dmipro``, unless the application already set one), exporting through the
  standard ``OTEL_*`` variables: ``OTEL_TRACES_EXPORTER`` (``otlp`` default, ``console``,
  ``none``), ``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`` (``http/protobuf`` default, or
  ``grpc`` with its exporter installed) and ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``.
  When the application set its own provider, it owns export: only the JSON-lines file
  and the exporters passed in are added;
- one span processor per tracer provider, the relay, behind which dmipro's processors
  come and go as subscribers are switched on and off;
- ``Settings.otel_export_file`` (``DMIPRO_OTEL_EXPORT_FILE``): a JSON-lines file of
  finished spans (``{pid}`` in the path is replaced by the process id), written as
  each span ends, the way to collect spans from worker processes in tests;
- a meter provider (``OTEL_METRICS_EXPORTER``, same values as for traces).

Every exporter is wrapped so that it scrubs secrets from what it sends and never
raises into the run. Exporters and the relay are duck-typed to the SDK's interfaces
(the SDK checks no base class), so this module imports without OpenTelemetry
installed; the SDK is imported where it is used.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dmipro._imports import guarded, try_import
from dmipro.errors import ConfigError
from dmipro.subscribers import REDACTED as _REDACTED
from dmipro.subscribers import is_secret_key, scrub_text, secret_values

__all__ = [
    "DEFAULT_SERVICE_NAME",
    "JsonLinesSpanExporter",
    "SdkWiring",
    "celery_instrumented",
    "instrument_celery",
    "read_span_file",
    "uninstrument_celery",
    "wire",
]

log = logging.getLogger(__name__)

_PURPOSE = "subscriber 'otel'"
DEFAULT_SERVICE_NAME = "dmipro"
_SCOPE = "dmipro"

_owned_providers: weakref.WeakSet[Any] = weakref.WeakSet()
_owned_meter_providers: weakref.WeakSet[Any] = weakref.WeakSet()
_relays: weakref.WeakKeyDictionary[Any, _Relay] = weakref.WeakKeyDictionary()
_provider_lock = threading.Lock()


def _sdk() -> Any:
    """The SDK's trace module, or the error naming the ``otel`` extra."""
    with guarded(extra="otel", purpose=_PURPOSE):
        from opentelemetry.sdk import trace as sdk_trace
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
    name = f"opentelemetry.exporter.otlp.proto.{package}.{module}"
    if package == "grpc":
        # Not in the otel extra: its own install line, and the way around it.
        try:
            return getattr(importlib.import_module(name), cls)()
        except ImportError as exc:
            raise ConfigError(
                "OTLP over grpc needs its exporter: pip install opentelemetry-exporter-otlp-proto-grpc "
                "(or use OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf)"
            ) from exc
    return getattr(try_import(name, extra="otel", purpose=_PURPOSE), cls)()


# -- exporters ------------------------------------------------------------------------


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


# -- wiring ---------------------------------------------------------------------------


class SdkWiring:
    """The tracer and meter providers one :func:`wire` call hooked into, and what it added to them."""

    def __init__(self, *, tracer_provider: Any, relay: _Relay, processors: list[Any], meter: Any,
                 meter_provider: Any) -> None:
        self.tracer_provider = tracer_provider
        self.relay = relay
        self.processors = processors
        self.meter = meter
        self.meter_provider = meter_provider

    def tracer(self) -> Any:
        """dmipro's tracer on the wired tracer provider."""
        return self.tracer_provider.get_tracer(_SCOPE)

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
        """Flush, take this wiring's processors off the relay and shut them (and its meter provider) down."""
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


def wire(*, span_exporters: Sequence[Any] = (), metric_readers: Sequence[Any] = (),
         export_file: str = "") -> SdkWiring:
    """Hook dmipro's span processors and a meter into the SDK; see the module docstring.

    ``span_exporters`` are added to those the environment asks for (batched, scrubbed,
    guarded); ``metric_readers`` likewise (a given reader gets a meter provider of its
    own); ``export_file`` is the JSON-lines file of finished spans ("" for none).
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
    meter, meter_provider = _meter_provider(metric_readers)
    processors: list[Any] = (
        [SimpleSpanProcessor(_guarded(JsonLinesSpanExporter(export_file)))] if export_file else []
    )
    processors += [BatchSpanProcessor(_guarded(exporter)) for exporter in batched]
    relay = _relay_for(provider)
    relay.processors = (*relay.processors, *processors)
    return SdkWiring(tracer_provider=provider, relay=relay, processors=processors, meter=meter,
                     meter_provider=meter_provider)


# -- Celery ---------------------------------------------------------------------------


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
    if importlib.util.find_spec("celery") is None or celery_instrumented():
        return False
    module = try_import("opentelemetry.instrumentation.celery", extra="otel", purpose=_PURPOSE)
    module.CeleryInstrumentor().instrument()
    return True


def uninstrument_celery() -> None:
    """Switch OpenTelemetry's Celery instrumentation off again (errors are logged, not raised)."""
    try:
        from opentelemetry.instrumentation.celery import CeleryInstrumentor

        CeleryInstrumentor().uninstrument()  # type: ignore[no-untyped-call]
    except Exception:
        log.debug("could not uninstrument Celery", exc_info=True)