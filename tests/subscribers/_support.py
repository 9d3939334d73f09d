"""Helpers for the observability tests: a tiny optimization job and a recording Langfuse server."""

from __future__ import annotations

import gzip
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import pytest

from dmipro import observability
from dmipro.config import reload_settings
from dmipro.events import Event, bus
from tests.fixtures.jobs import math_job, records


def metric_points(reader: Any) -> dict[str, list[Any]]:
    """Every data point an OpenTelemetry in-memory metric reader holds, by metric name."""
    out: dict[str, list[Any]] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                out.setdefault(metric.name, []).extend(metric.data.data_points)
    return out


@pytest.fixture
def quiet_otel(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """OTLP export off unless a test turns it on; subscribers switched off after each test."""
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    monkeypatch.delenv("DMIPRO_OTEL_EXPORT_FILE", raising=False)
    reload_settings()  # the export file is a setting, read once
    for var in ("LANGFUSE_PUBLIC_KEY", "LANGFUSE_SECRET_KEY", "LANGFUSE_BASE_URL", "LANGFUSE_HOST"):
        monkeypatch.delenv(var, raising=False)
    yield
    observability.shutdown()


@pytest.fixture
def recorded_events() -> Iterator[list[Event]]:
    """Every event emitted during the test, in order."""
    events: list[Event] = []
    sub = bus.subscribe("*", events.append)
    yield events
    bus.remove(sub)


def tiny_spec(**overrides: Any) -> dict[str, Any]:
    """A job spec small enough to optimize in about a second on the simulator."""
    spec = math_job(
        name="tiny",
        trainset=records("train", 20),
        valset=records("train", 40)[20:],
        prompt_lm={"model": "sim/math", "temperature": 1.0},
        optimizer={"auto": None, "num_candidates": 3, "num_trials": 3, "minibatch_size": 10, "seed": 9},
        executor={"backend": "thread", "concurrency": 8},
    )
    spec.update(overrides)
    return spec


def run_tiny(spec: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """Create a job row for ``spec`` and run it in-process; returns (job id, summary)."""
    from dmipro.jobs import JobStore, load_job
    from dmipro.teleprompt.mipro import run_job

    job = load_job(spec or tiny_spec())
    job_id = JobStore().create(name=job.spec.name, spec=job.to_json(), executor="thread").id
    return job_id, run_job(job_id)


def register_versions(job_id: str) -> list[Any]:
    """Register two versions of math_qa (the second one from ``job_id``) in the configured registry."""
    import dmipro.registry as registry
    from dmipro.storage import ProgramRecord
    from examples.math_qa.program import build

    infos = []
    for i, score in enumerate((60.0, 75.0)):
        program = build()
        predictor = program.named_predictors()[0][1]
        instructions = f"Solve it step by step, version {i + 1}."
        predictor.signature = predictor.signature.with_instructions(instructions)
        predictor.demos = [{"question": "What is 2 + 3?", "reasoning": "2 + 3 = 5", "answer": "5"}]
        record = ProgramRecord.from_program(program, program_ref="examples.math_qa.program:build",
                                            job_id=job_id, baseline_score=55.0, best_score=score)
        infos.append(registry.register("math_qa", record, deploy=False))
    return infos


@dataclass
class Captured:
    """One request the fake Langfuse server received."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any
    raw: bytes = b""


@dataclass
class _Prompt:
    name: str
    version: int
    body: dict[str, Any]
    labels: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {**self.body, "name": self.name, "version": self.version, "labels": self.labels,
                "tags": self.body.get("tags") or [], "config": self.body.get("config") or {},
                "type": self.body.get("type", "text")}


class FakeLangfuse:
    """A Langfuse stand-in on a free loopback port that records every request and answers plausibly.

    OTLP trace exports are decoded (gzip, protobuf) to dicts; prompts are versioned and
    labels moved as Langfuse does; ``fail_status`` (e.g. 401, keys revoked) answers every
    request with that error.
    """

    def __init__(self, *, fail_status: int | None = None) -> None:
        self.fail_status = fail_status
        self.requests: list[Captured] = []
        self.prompts: dict[str, list[_Prompt]] = {}
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeLangfuse:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- views --------------------------------------------------------------------------
    def spans(self) -> list[dict[str, Any]]:
        """Every exported span, flattened: name, trace/span/parent ids (hex), attributes."""
        out: list[dict[str, Any]] = []
        for req in self.requests:
            if req.path != "/api/public/otel/v1/traces":
                continue
            for rs in req.body.get("resourceSpans", []):
                for ss in rs.get("scopeSpans", []):
                    for s in ss.get("spans", []):
                        out.append({
                            "name": s["name"],
                            "trace_id": s["traceId"],
                            "span_id": s["spanId"],
                            "parent_span_id": s.get("parentSpanId"),
                            "attributes": {a["key"]: _any_value(a["value"]) for a in s.get("attributes", [])},
                        })
        return out

    def scores(self) -> list[dict[str, Any]]:
        return [s for r in self.requests if r.path == "/api/public/scores" and r.method == "POST"
                for s in (r.body if isinstance(r.body, list) else [r.body])]

    def calls(self, method: str, prefix: str) -> list[Captured]:
        return [r for r in self.requests if r.method == method and r.path.startswith(prefix)]

    def dump(self) -> str:
        """Everything received, as text (for searching for leaked secrets)."""
        return "\n".join(f"{r.method} {r.path} {r.headers} {json.dumps(r.body, default=str)}"
                         for r in self.requests)

    # -- server -------------------------------------------------------------------------
    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _read(self) -> tuple[bytes, Any]:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                data = gzip.decompress(raw) if self.headers.get("Content-Encoding") == "gzip" else raw
                if "protobuf" in (self.headers.get("Content-Type") or ""):
                    from google.protobuf.json_format import MessageToDict
                    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

                    msg = trace_service_pb2.ExportTraceServiceRequest()
                    msg.ParseFromString(data)
                    body = MessageToDict(msg)
                    for rs in body.get("resourceSpans", []):  # ids as hex, like everywhere else
                        for ss in rs.get("scopeSpans", []):
                            for s in ss.get("spans", []):
                                for key in ("traceId", "spanId", "parentSpanId"):
                                    if key in s:
                                        s[key] = _b64_hex(s[key])
                    return raw, body
                return raw, json.loads(data) if data else None

            def _answer(self, method: str) -> None:
                url = urlparse(self.path)
                raw, body = self._read() if method in ("POST", "PATCH", "PUT") else (b"", None)
                with fake._lock:
                    fake.requests.append(Captured(method, url.path, parse_qs(url.query),
                                                  {k.lower(): v for k, v in self.headers.items()},
                                                  body, raw))
                    status, payload, ctype = fake._route(method, url.path, parse_qs(url.query), body)
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:  # noqa: N802
                self._answer("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._answer("POST")

            def do_PATCH(self) -> None:  # noqa: N802
                self._answer("PATCH")

        return Handler

    def _route(self, method: str, path: str, query: dict[str, list[str]],
               body: Any) -> tuple[int, bytes, str]:
        def ok(data: Any, status: int = 200) -> tuple[int, bytes, str]:
            return status, json.dumps(data).encode(), "application/json"

        if self.fail_status is not None:
            return ok({"message": "refused"}, self.fail_status)
        if path == "/api/public/otel/v1/traces":
            return 200, b"", "application/x-protobuf"
        if path == "/api/public/scores":
            return ok({"message": "Accepted"}, 202)
        if path == "/api/public/v2/prompts" and method == "POST":
            versions = self.prompts.setdefault(body["name"], [])
            prompt = _Prompt(body["name"], len(versions) + 1, body, list(body.get("labels") or []))
            self._move_labels(versions, prompt.labels)
            versions.append(prompt)
            return ok(prompt.to_json(), 201)
        if path.startswith("/api/public/v2/prompts/"):
            rest = path[len("/api/public/v2/prompts/"):]
            if method == "PATCH" and "/versions/" in rest:
                name, _, version = rest.rpartition("/versions/")
                versions = self.prompts.get(unquote(name), [])
                prompt = next((p for p in versions if p.version == int(version)), None)
                if prompt is None:
                    return ok({"message": "not found"}, 404)
                labels = list(body.get("newLabels") or [])
                self._move_labels(versions, labels)
                prompt.labels = sorted(set(prompt.labels) | set(labels))
                return ok(prompt.to_json())
            if method == "GET":
                versions = self.prompts.get(unquote(rest), [])
                label = (query.get("label") or ["production"])[0]
                found = next((p for p in versions if label in p.labels), None)
                return ok(found.to_json()) if found else ok({"message": "not found"}, 404)
        return ok({})

    @staticmethod
    def _move_labels(versions: list[_Prompt], labels: list[str]) -> None:
        for other in versions:
            other.labels = [label for label in other.labels if label not in labels]


def _b64_hex(value: str) -> str:
    import base64

    return base64.b64decode(value).hex()


def _any_value(value: dict[str, Any]) -> Any:
    for key in ("stringValue", "boolValue", "doubleValue"):
        if key in value:
            return value[key]
    if "intValue" in value:
        return int(value["intValue"])
    if "arrayValue" in value:
        return [_any_value(v) for v in value["arrayValue"].get("values", [])]
    return value


def iter_strings(value: Any) -> Iterator[str]:
    """Every string inside a nested structure."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from iter_strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from iter_strings(v)


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
