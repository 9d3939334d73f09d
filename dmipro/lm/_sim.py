"""SimLM: an offline, deterministic language model for DSPy programs.

:class:`SimEngine` is a DSPy 3.4 engine (``complete(Request) -> Response``); :func:`sim_lm`
wraps it in a ``dspy.LM`` (``sim_lm("sim/math")``). It reads the messages DSPy's
ChatAdapter, JSONAdapter and XMLAdapter send — output fields and their types from the
system message, the instruction after "your objective is:", few-shot demos as earlier
user/assistant pairs, the inputs in the last user message — and answers in the format of
the adapter that asked.

The simulator lives in three modules:

* :mod:`dmipro.lm._surface` — what the model answers: the response surface of the ``math``
  task (documented there, and returned as data by :func:`describe`) and the proposer's text;
* :mod:`dmipro.lm._prompt` — reading the adapters' prompts, writing replies in their format
  and filler values of any declared type;
* this module — the engine: options, latency, failure injection and the public API.

Latency (fixed or lognormal), rate limits (``dspy.lm15.RateLimitError`` with
``retry_after``), server errors, timeouts and malformed replies are injected per
:data:`SIM_OPTIONS`; DSPy's LM layer retries the first three as it would a provider's.
``dmipro.lm.server`` serves the same engine as an OpenAI-compatible HTTP API.

Determinism
-----------
Every answer is a pure function of the prompt, the temperature and ``seed`` (how the math
draw uses them is in :mod:`dmipro.lm._surface`). DSPy 3.4 strips ``rollout_id`` before a
request reaches an engine, so rollouts of the same prompt at the same temperature return
the same text. Injected failures hash the prompt, the seed and how many times this engine
has seen that prompt, so a retry can succeed while a fresh engine replays the same
sequence. A failure never changes what a later successful attempt answers.
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import dspy
from dspy.lm15 import (
    Message,
    RateLimitError,
    Request,
    Response,
    ServerError,
    TextPart,
    Usage,
    response_to_events,
)
from dspy.lm15 import TimeoutError as LMTimeoutError

from dmipro.errors import ConfigError
from dmipro.lm import _math
from dmipro.lm._prompt import _filler, _malformed, _Prompt, _read_prompt, _render
from dmipro.lm._surface import (
    _PROPOSER_FIELDS,
    OPTIMAL_INSTRUCTION,
    PHRASES,
    TASKS,
    Phrase,
    _digest,
    _math_values,
    _proposer_value,
    _temperature_key,
    _unit,
    describe,
    instruction_effect,
)

__all__ = [
    "OPTIMAL_INSTRUCTION",
    "PHRASES",
    "SIM_OPTIONS",
    "TASKS",
    "AsyncSimEngine",
    "Phrase",
    "SimEngine",
    "SimReply",
    "describe",
    "instruction_effect",
    "sim_lm",
]

SIM_OPTIONS = frozenset(
    {
        "task", "latency_ms", "latency_dist", "latency_sigma", "rate_limit_rate", "retry_after_s",
        "server_error_rate", "timeout_rate", "malformed_rate", "seed",
    }
)
"""Option names :class:`SimEngine` accepts (a job spec's ``sim:`` block is checked against it)."""

# --- the engine ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SimReply:
    """One simulated completion: the text and its approximate token counts."""

    text: str
    input_tokens: int
    output_tokens: int
    finish_reason: str = "stop"


def _tokens(chars: int) -> int:
    # About four characters per token, as in common BPE vocabularies on English text.
    return max(1, (chars + 3) // 4)


class SimEngine:
    """A simulated LM behind DSPy's engine contract (``complete``, ``stream``, ``close``).

    Deterministic in (prompt, temperature, ``seed``); see :mod:`dmipro.lm._surface` for the
    response surface. Thread-safe: the only mutable state is the per-prompt attempt
    counter used by error injection, guarded by a lock. The engine holds no connection,
    so ``close()`` does nothing and one engine may serve many ``dspy.LM`` copies.
    """

    def __init__(
        self,
        task: str = "math",
        *,
        latency_ms: float = 0.0,
        latency_dist: str = "fixed",
        latency_sigma: float = 0.5,
        rate_limit_rate: float = 0.0,
        retry_after_s: float = 1.0,
        server_error_rate: float = 0.0,
        timeout_rate: float = 0.0,
        malformed_rate: float = 0.0,
        seed: int = 0,
    ) -> None:
        if task not in TASKS:
            raise ConfigError(f"unknown simulator task {task!r}; expected one of {', '.join(TASKS)}")
        if latency_dist not in ("fixed", "lognormal"):
            raise ConfigError(f"latency_dist must be 'fixed' or 'lognormal', not {latency_dist!r}")
        for name, rate in (("rate_limit_rate", rate_limit_rate), ("server_error_rate", server_error_rate),
                           ("timeout_rate", timeout_rate), ("malformed_rate", malformed_rate)):
            if not 0.0 <= rate <= 1.0:
                raise ConfigError(f"{name} must be between 0 and 1, not {rate!r}")
        for name, value in (("latency_ms", latency_ms), ("latency_sigma", latency_sigma),
                            ("retry_after_s", retry_after_s)):
            if value < 0:
                raise ConfigError(f"{name} must be >= 0, not {value!r}")
        self.task = task
        self.latency_ms = float(latency_ms)
        self.latency_dist = latency_dist
        self.latency_sigma = float(latency_sigma)
        self.rate_limit_rate = float(rate_limit_rate)
        self.retry_after_s = float(retry_after_s)
        self.server_error_rate = float(server_error_rate)
        self.timeout_rate = float(timeout_rate)
        self.malformed_rate = float(malformed_rate)
        self.seed = int(seed)
        self._attempts: dict[bytes, int] = {}
        self._lock = threading.Lock()

    @property
    def options(self) -> dict[str, Any]:
        """The constructor options, as a JSON-ready dict."""
        return {name: getattr(self, name) for name in sorted(SIM_OPTIONS)}

    def dump_state(self) -> dict[str, Any]:
        """State for ``dspy.LM.dump_state`` (a saved program records its LM this way)."""
        return self.options

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> SimEngine:
        """Rebuild an engine from :meth:`dump_state`."""
        return cls(**state)

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.options.items() if v != _DEFAULTS.get(k)}
        return f"SimEngine({', '.join(f'{k}={v!r}' for k, v in changed.items())})"

    # DSPy's engine contract -------------------------------------------------------------

    def complete(self, request: Request) -> Response:
        """Answer one canonical request; raises ``dspy.lm15`` errors when a failure is injected."""
        system = request.system if isinstance(request.system, str) else "".join(
            getattr(part, "text", "") for part in request.system or ()
        )
        messages = [
            (m.role, "".join(p.text for p in m.parts if isinstance(p, TextPart))) for m in request.messages
        ]
        reply = self.respond(system, messages, temperature=request.config.temperature)
        return Response(
            id=None,
            model=request.model,
            message=Message.assistant([TextPart(reply.text)]),
            finish_reason="stop",
            usage=Usage(input_tokens=reply.input_tokens, output_tokens=reply.output_tokens),
        )

    def stream(self, request: Request) -> Iterator[Any]:
        """The completion as canonical stream events (one delta)."""
        return iter(response_to_events(self.complete(request)))

    def close(self) -> None:
        """Nothing to release."""

    # The simulator itself, shared with the HTTP server --------------------------------------

    def respond(self, system: str, messages: Sequence[tuple[str, str]], *,
                temperature: float | None = None) -> SimReply:
        """Simulate one completion of ``(system, [(role, text), ...])`` at ``temperature``.

        Sleeps for the configured latency, then raises ``dspy.lm15.RateLimitError`` (with
        ``retry_after``), ``ServerError`` or ``TimeoutError`` when a failure is injected.
        """
        prompt = _read_prompt(system, messages)
        key = _digest(prompt.text, _temperature_key(temperature), self.seed)
        failures = self.rate_limit_rate or self.server_error_rate or self.timeout_rate or self.malformed_rate
        attempt = self._attempt(key) if failures else 0
        self._sleep(key, attempt)
        chance = _digest(key.hex(), attempt, "failures")
        if self.rate_limit_rate and _unit(chance) < self.rate_limit_rate:
            raise RateLimitError("simulated rate limit (429)", status=429, provider="sim",
                                 retry_after=self.retry_after_s)
        if self.server_error_rate and _unit(chance, 8) < self.server_error_rate:
            raise ServerError("simulated server error (500)", status=500, provider="sim")
        failure = _digest(key.hex(), attempt, "more")
        if self.timeout_rate and _unit(failure) < self.timeout_rate:
            raise LMTimeoutError("simulated request timeout", status=504, provider="sim")
        values = self._values(prompt, key, temperature)
        fmt = prompt.system.fmt
        if self.malformed_rate and _unit(failure, 8) < self.malformed_rate:
            text = _malformed(values, fmt, failure)
        else:
            text = _render(values, fmt)
        return SimReply(text, _tokens(len(prompt.text)), _tokens(len(text)))

    def _values(self, prompt: _Prompt, key: bytes, temperature: float | None) -> dict[str, Any]:
        outputs = prompt.system.outputs
        names = {f.name for f in outputs}
        if names & _PROPOSER_FIELDS:
            rng = random.Random(int.from_bytes(key, "big"))
            return {
                f.name: _proposer_value(f.name, prompt, rng) if f.name in _PROPOSER_FIELDS
                else _filler(f, key)
                for f in outputs
            }
        for value in prompt.inputs.values():
            problem = _math.parse(value)
            if problem is not None:
                return _math_values(prompt, problem, value, self.seed, temperature)
        return {f.name: _filler(f, key) for f in outputs}

    def _attempt(self, key: bytes) -> int:
        with self._lock:
            count = self._attempts.get(key, 0)
            self._attempts[key] = count + 1
            if len(self._attempts) > _MAX_TRACKED:
                # Retries follow their first attempt closely; forget the oldest prompts.
                del self._attempts[next(iter(self._attempts))]
        return count

    def _sleep(self, key: bytes, attempt: int) -> None:
        if self.latency_ms > 0:
            time.sleep(self._latency(key, attempt))

    def _latency(self, key: bytes, attempt: int) -> float:
        """Seconds to wait for one attempt: ``latency_ms``, or a lognormal draw with that median."""
        seconds = self.latency_ms / 1000.0
        if self.latency_dist == "lognormal":
            u = min(max(_unit(_digest(key.hex(), attempt, "latency")), 1e-9), 1 - 1e-9)
            seconds *= math.exp(self.latency_sigma * _NORMAL.inv_cdf(u))
        return seconds


_NORMAL = statistics.NormalDist()
_MAX_TRACKED = 100_000
_DEFAULTS: dict[str, Any] = {
    "task": "math", "latency_ms": 0.0, "latency_dist": "fixed", "latency_sigma": 0.5, "rate_limit_rate": 0.0,
    "retry_after_s": 1.0, "server_error_rate": 0.0, "timeout_rate": 0.0, "malformed_rate": 0.0, "seed": 0,
}


class AsyncSimEngine:
    """The async counterpart DSPy uses for ``acall``: runs :class:`SimEngine` in a worker thread."""

    def __init__(self, sync: SimEngine) -> None:
        self.sync = sync

    async def complete(self, request: Request) -> Response:
        """Answer one request without blocking the event loop."""
        return await asyncio.to_thread(self.sync.complete, request)

    async def stream(self, request: Request) -> Any:
        """The completion as canonical stream events."""
        for event in response_to_events(await self.complete(request)):
            yield event

    async def aclose(self) -> None:
        """Nothing to release."""

    def dump_state(self) -> dict[str, Any]:
        """State for ``dspy.LM.dump_state``."""
        return self.sync.dump_state()

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> AsyncSimEngine:
        """Rebuild from :meth:`dump_state`."""
        return cls(SimEngine.load_state(state))


def _task_of(model: str) -> str:
    provider, _, task = model.partition("/")
    if provider != "sim" or not task:
        raise ConfigError(f"a simulated model is named 'sim/<task>', e.g. 'sim/math', not {model!r}")
    return task


def sim_lm(model: str = "sim/math", *, lm_class: type[dspy.LM] = dspy.LM, **options: Any) -> dspy.LM:
    """A ``dspy.LM`` backed by :class:`SimEngine`; the task is the part after ``sim/``.

    Options in :data:`SIM_OPTIONS` configure the engine; the rest (``temperature``,
    ``max_tokens``, ``num_retries``, ``cache``...) go to ``dspy.LM`` (or ``lm_class``, a
    subclass of it). The response cache is off unless ``cache=True`` is passed.
    """
    engine_options = {k: v for k, v in options.items() if k in SIM_OPTIONS}
    lm_options = {k: v for k, v in options.items() if k not in SIM_OPTIONS}
    task = engine_options.pop("task", None) or _task_of(model)
    if task != _task_of(model):
        raise ConfigError(f"model {model!r} names task {_task_of(model)!r} but task={task!r} was given")
    engine = SimEngine(task, **engine_options)
    lm_options.setdefault("cache", False)
    return lm_class(model, engine=engine, async_engine=AsyncSimEngine(engine), **lm_options)
