"""SimLM behind an OpenAI-compatible HTTP API (stdlib only).

Endpoints:

* ``POST /v1/chat/completions`` — model ``sim-math`` (or ``sim/math``) answers with the same
  text the in-process :class:`~dmipro.lm._sim.SimEngine` gives for the same messages and
  temperature. Injected failures answer 429 (with ``Retry-After`` and ``retry-after-ms``),
  500 or 504 (after ``timeout_s`` seconds when set, so a client's own timeout fires
  first, as with a provider that hangs). ``"stream": true`` is answered as server-sent events.
* ``GET /v1/models`` — the simulated models.

Like a real provider it can also enforce a limit and refuse keys:

* ``rpm`` / ``tpm``: requests and tokens per minute for the whole server (token buckets
  with a one-second burst). Over the limit it answers 429 ``rate_limit_exceeded`` with
  ``Retry-After``, and every answer carries OpenAI's ``x-ratelimit-limit-*``,
  ``x-ratelimit-remaining-*`` and ``x-ratelimit-reset-*`` headers.
* ``reject_key``: every completion is answered 401 ``invalid_api_key``, as OpenAI
  answers a revoked key.

``server.stats`` counts requests by status, for tests and benchmarks.

Point any OpenAI client at it, e.g.
``dspy.LM("openai/sim-math", api_base="http://127.0.0.1:8000/v1", api_key="x")``.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from dspy.lm15 import RateLimitError, ServerError
from dspy.lm15 import TimeoutError as LMTimeoutError

from dmipro.errors import ConfigError
from dmipro.lm._sim import SIM_OPTIONS, TASKS, SimEngine

__all__ = ["MAX_N", "SimHTTPServer", "make_server", "run_server", "serve", "serve_in_thread"]

_MODEL = re.compile(r"^(?:openai/)?sim[-/_](\w+)$")

MAX_N = 16
"""Most completions one request may ask for (``n``): each costs the server CPU, and anyone who
reaches the port may ask."""


class SimHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server holding one :class:`SimEngine` per task.

    Each request runs in its own daemon thread; engines are thread-safe and shared.
    ``url`` is the base URL to give an OpenAI client (ends in ``/v1``).
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        options: dict[str, Any],
        *,
        rpm: int | None = None,
        tpm: int | None = None,
        reject_key: bool = False,
        timeout_s: float = 0.0,
    ) -> None:
        unknown = set(options) - SIM_OPTIONS
        if unknown:
            raise ConfigError(f"unknown simulator options: {', '.join(sorted(unknown))}")
        for name, value in (("rpm", rpm), ("tpm", tpm)):
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1, not {value!r}")
        if timeout_s < 0:
            raise ConfigError(f"timeout_s must be >= 0, not {timeout_s!r}")
        self.options = {k: v for k, v in options.items() if k != "task"}
        self.engines = {task: SimEngine(task, **self.options) for task in TASKS}
        self.reject_key = reject_key
        self.timeout_s = float(timeout_s)
        self.limits = {name: _Bucket(limit) for name, limit in (("requests", rpm), ("tokens", tpm)) if limit}
        self.stats: dict[str, int] = {}
        self._stats_lock = threading.Lock()
        super().__init__(address, _Handler)

    def count(self, status: int) -> None:
        """Count one answered request under its status (``stats["total"]`` counts them all)."""
        with self._stats_lock:
            self.stats[str(status)] = self.stats.get(str(status), 0) + 1
            self.stats["total"] = self.stats.get("total", 0) + 1

    def admit(self, tokens: int) -> tuple[float, dict[str, str]]:
        """Take one request and ``tokens`` from the limits: (seconds to wait, 0 if taken; headers)."""
        headers: dict[str, str] = {}
        wait = 0.0
        for name, bucket in self.limits.items():
            cost = 1.0 if name == "requests" else float(tokens)
            wait = max(wait, bucket.take(cost) if wait == 0 else bucket.peek(cost))
            headers.update(bucket.headers(name))
        return wait, headers

    @property
    def url(self) -> str:
        """Base URL of the OpenAI-compatible API, e.g. ``http://127.0.0.1:8000/v1``."""
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    def engine_for(self, model: str) -> SimEngine | None:
        """The engine serving ``model`` (``sim-math``, ``sim/math``), or ``None``."""
        match = _MODEL.match(model)
        return self.engines.get(match.group(1)) if match else None


class _Bucket:
    """A per-minute limit as a token bucket holding one second's worth (thread-safe)."""

    def __init__(self, per_minute: int) -> None:
        self.limit = per_minute
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate)
        self.tokens = self.capacity
        self.stamp = time.monotonic()
        self.lock = threading.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, cost: float) -> float:
        cost = min(cost, self.capacity)
        with self.lock:
            self._refill()
            if self.tokens >= cost:
                self.tokens -= cost
                return 0.0
            return (cost - self.tokens) / self.rate

    def peek(self, cost: float) -> float:
        with self.lock:
            self._refill()
            return max(0.0, (min(cost, self.capacity) - self.tokens) / self.rate)

    def headers(self, name: str) -> dict[str, str]:
        with self.lock:
            # OpenAI reports the per-minute limit and the time until the bucket is full again.
            remaining = int(self.tokens / self.capacity * self.limit)
            reset = (self.capacity - self.tokens) / self.rate
        return {
            f"x-ratelimit-limit-{name}": str(self.limit),
            f"x-ratelimit-remaining-{name}": str(max(0, remaining)),
            f"x-ratelimit-reset-{name}": f"{max(reset, 0.001):.3f}s",
        }


class _Handler(BaseHTTPRequestHandler):
    server: SimHTTPServer
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes; without TCP_NODELAY, Nagle's algorithm
        # and delayed ACKs add ~40 ms to every call on a kept-alive connection.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        # One line per call on stderr would drown a benchmark; the server stays quiet.
        return

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path in ("/v1/models", "/models"):
            data = [{"id": f"sim-{task}", "object": "model", "created": 0, "owned_by": "dmipro"}
                    for task in TASKS]
            self._json(HTTPStatus.OK, {"object": "list", "data": data})
        elif path in ("/health", "/v1/health"):
            self._json(HTTPStatus.OK, {"status": "ok"})
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no route for GET {path}", "not_found")

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if path not in ("/v1/chat/completions", "/chat/completions"):
            self._error(HTTPStatus.NOT_FOUND, f"no route for POST {path}", "not_found")
            return
        try:
            body = json.loads(raw or b"{}")
            if not isinstance(body, dict):
                raise ValueError("the request body must be a JSON object")
            model = str(body.get("model", ""))
            system, messages = _split_messages(body.get("messages"))
            temperature = body.get("temperature")
            if temperature is not None and not isinstance(temperature, (int, float)):
                raise ValueError("temperature must be a number")
            count = int(body.get("n") or 1)
            if not 1 <= count <= MAX_N:
                raise ValueError(f"n must be between 1 and {MAX_N}, got {count}")
        except (ValueError, TypeError) as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc), "invalid_request_error")
            return
        if self.server.reject_key:
            self._error(HTTPStatus.UNAUTHORIZED, "Incorrect API key provided. You can find your API key "
                        "in your account settings.", "invalid_api_key", type_="invalid_request_error")
            return
        engine = self.server.engine_for(model)
        if engine is None:
            self._error(HTTPStatus.NOT_FOUND, f"unknown model {model!r}; try sim-math", "model_not_found")
            return
        chars = len(system) + sum(len(text) for _, text in messages)
        tokens = chars // 4 + int(body.get("max_tokens") or 0)
        wait, limit_headers = self.server.admit(tokens)
        if wait > 0:
            headers = {"Retry-After": _seconds(max(wait, 0.001)),
                       "retry-after-ms": str(max(1, int(wait * 1000))), **limit_headers}
            self._error(HTTPStatus.TOO_MANY_REQUESTS,
                        f"Rate limit reached for {model}. Please try again in {wait:.3f}s.",
                        "rate_limit_exceeded", headers, type_="requests")
            return
        try:
            replies = [engine.respond(system, messages, temperature=temperature)
                       for _ in range(max(1, count))]
        except RateLimitError as exc:
            seconds = exc.retry_after if exc.retry_after is not None else 1.0
            headers = {"Retry-After": _seconds(seconds), "retry-after-ms": str(int(seconds * 1000))}
            self._error(HTTPStatus.TOO_MANY_REQUESTS, exc.message, "rate_limit_exceeded",
                        {**headers, **limit_headers})
            return
        except ServerError as exc:
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, exc.message, "server_error", limit_headers)
            return
        except LMTimeoutError as exc:
            if self.server.timeout_s:
                time.sleep(self.server.timeout_s)  # hang like a stuck provider; the client times out first
            self._error(HTTPStatus.GATEWAY_TIMEOUT, exc.message, "timeout", limit_headers)
            return
        created = int(time.time())
        completion_id = f"chatcmpl-sim-{uuid.uuid4().hex[:16]}"
        usage = {
            "prompt_tokens": replies[0].input_tokens,
            "completion_tokens": sum(r.output_tokens for r in replies),
            "total_tokens": replies[0].input_tokens + sum(r.output_tokens for r in replies),
        }
        if body.get("stream"):
            self._stream(completion_id, created, model, replies[0].text, usage)
            return
        choices = [
            {"index": i, "message": {"role": "assistant", "content": r.text},
             "finish_reason": r.finish_reason, "logprobs": None}
            for i, r in enumerate(replies)
        ]
        self._json(HTTPStatus.OK, {"id": completion_id, "object": "chat.completion", "created": created,
                                   "model": model, "choices": choices, "usage": usage}, limit_headers)

    # --- responses -----------------------------------------------------------------------

    def _json(self, status: HTTPStatus, payload: dict[str, Any],
              headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.server.count(int(status))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: HTTPStatus, message: str, code: str,
               headers: dict[str, str] | None = None, *, type_: str | None = None) -> None:
        error = {"message": message, "type": type_ or code, "code": code, "param": None}
        self._json(status, {"error": error}, headers)

    def _stream(self, completion_id: str, created: int, model: str, text: str, usage: dict[str, int]) -> None:
        base = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}
        chunks = [
            {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": text},
                                  "finish_reason": None}]},
            {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": usage},
        ]
        data = "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks).encode() + b"data: [DONE]\n\n"
        self.server.count(HTTPStatus.OK)
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.3f}".rstrip("0")


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    raise ValueError("message content must be a string or a list of parts")


def _split_messages(messages: Any) -> tuple[str, list[tuple[str, str]]]:
    """OpenAI chat messages as the engine reads them: the system text and (role, text) turns."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    system: list[str] = []
    turns: list[tuple[str, str]] = []
    for message in messages:
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError("each message must be an object with a role")
        role, text = str(message["role"]), _text(message.get("content"))
        if role in ("system", "developer") and not turns:
            system.append(text)
        else:
            turns.append((role, text))
    return "\n\n".join(system), turns


_SERVER_OPTIONS = ("rpm", "tpm", "reject_key", "timeout_s")


def make_server(host: str = "127.0.0.1", port: int = 0, **options: Any) -> SimHTTPServer:
    """A bound, not yet serving, simulator server (``port=0`` picks a free port).

    ``options`` are :class:`~dmipro.lm._sim.SimEngine` options (seed, latency and failure
    rates) and the server's own ``rpm``, ``tpm``, ``reject_key`` and ``timeout_s``; call
    ``serve_forever()`` on the result, or use :func:`serve`.
    """
    own = {k: options.pop(k) for k in _SERVER_OPTIONS if k in options}
    return SimHTTPServer((host, port), options, **own)


def serve(host: str = "127.0.0.1", port: int = 8000, **options: Any) -> None:
    """Serve the simulator until interrupted (blocks)."""
    server = make_server(host, port, **options)
    try:
        server.serve_forever()
    finally:
        server.server_close()


def run_server(host: str = "127.0.0.1", port: int = 8000, **options: Any) -> None:
    """Blocking entry point for ``dmipro sim serve``: serves until Ctrl-C, then closes cleanly."""
    try:
        serve(host, port, **options)
    except KeyboardInterrupt:
        pass


def serve_in_thread(host: str = "127.0.0.1", port: int = 0, **options: Any) -> SimHTTPServer:
    """Start a server on a daemon thread and return it (tests, benchmarks).

    Stop it with ``server.shutdown(); server.server_close()``.
    """
    server = make_server(host, port, **options)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="sim-http",
                     daemon=True).start()
    return server
