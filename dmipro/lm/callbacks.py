"""One DSPy callback that reports every LM call, with its own usage, to listeners.

DSPy calls ``on_lm_start``/``on_lm_end`` around each ``LM.__call__``/``acall`` on the
caller's thread (and context), but hands the end hook only the outputs. To give each
call its *own* tokens, the start hook puts a per-call usage meter in front of whatever
tracker is active (``dmipro.lm.usage.metered()`` in a task) and the end hook reads it:
DSPy reports usage to the innermost tracker, ours records it and passes it on. A call's
numbers are therefore exactly what the task's meter counted, so spans add up to the
run's :class:`~dmipro.lm.usage.Usage` totals. A call served from DSPy's response cache
reports no usage (DSPy bills none): it is a cache hit with zero tokens and zero cost.

The callback is registered once in DSPy's global settings, next to the user's own
callbacks (it is appended, never replacing them) and removed when the last listener
goes. Listeners (:class:`LMCallListener`) are no-op hook classes; one that raises is
logged and skipped, so observability never breaks an LM call.
"""

from __future__ import annotations

import importlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dspy.utils.callback import BaseCallback

from dmipro.events import current_job_id, current_trial
from dmipro.lm.usage import Usage, UsageMeter

__all__ = [
    "LMCall",
    "LMCallListener",
    "LMCallbacks",
    "add_listener",
    "callback",
    "installed",
    "listeners",
    "remove_listener",
]

log = logging.getLogger(__name__)

_PARAMS = ("temperature", "max_tokens", "max_completion_tokens", "top_p", "n", "num_generations", "stop")
_MAX_TEXT = 20_000


@dataclass
class LMCall:
    """One LM call as listeners see it; usage fields are filled when it ends.

    ``cost_usd`` is None when the model's price is unknown (never a silent zero).
    ``messages`` and ``outputs`` are JSON text, present only when text capture is on.
    """

    call_id: str
    model: str
    job_id: str | None = None
    trial: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    start_ns: int = 0
    end_ns: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int | None = None
    cost_usd: float | None = 0.0
    cache_hit: bool = False
    error_type: str | None = None
    error: str | None = None
    messages: str | None = None
    outputs: str | None = None
    usage: Usage = field(default_factory=Usage)

    @property
    def provider(self) -> str:
        """The model name's provider prefix: ``openai`` for ``openai/gpt-4o``, ``sim`` for ``sim/math``."""
        return self.model.split("/", 1)[0] if "/" in self.model else "unknown"

    @property
    def duration_s(self) -> float:
        return max(0, self.end_ns - self.start_ns) / 1e9


class LMCallListener:
    """Base for LM-call listeners: every hook is a no-op.

    ``on_start`` runs on the calling thread before the request and may return any state;
    ``on_end`` gets the finished call and that state, on the same thread and context.
    Both must be quick and must not raise (a raise is logged and ignored).
    """

    def on_start(self, call: LMCall) -> Any:
        """Called before the LM request; the return value comes back to ``on_end``."""
        return None

    def on_end(self, call: LMCall, state: Any) -> None:
        """Called after the LM call returned or raised."""

    def close(self) -> None:
        """Flush and release resources; called when the listener is removed."""


class _CallMeter(UsageMeter):
    """Meters one call and passes each usage report on to the tracker it stands in front of."""

    def __init__(self, outer: Any) -> None:
        super().__init__()
        self.outer = outer
        self.cached_input_tokens: int | None = None

    def add_usage(self, lm: str, usage_entry: dict[str, Any]) -> None:
        super().add_usage(lm, usage_entry)
        details = usage_entry.get("prompt_tokens_details") or usage_entry.get("input_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        if isinstance(cached, int):
            self.cached_input_tokens = (self.cached_input_tokens or 0) + cached
        if self.outer is not None:
            self.outer.add_usage(lm, usage_entry)


@dataclass
class _Open:
    call: LMCall
    meter: _CallMeter
    context: Any
    states: list[tuple[LMCallListener, Any]]


class LMCallbacks(BaseCallback):  # type: ignore[misc]
    """The DSPy callback behind :func:`add_listener`; see the module docstring."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listeners: tuple[LMCallListener, ...] = ()
        self._open: dict[str, _Open] = {}
        self.capture_text = False

    @property
    def listeners(self) -> tuple[LMCallListener, ...]:
        return self._listeners

    def add(self, listener: LMCallListener) -> None:
        with self._lock:
            if listener not in self._listeners:
                self._listeners = (*self._listeners, listener)

    def remove(self, listener: LMCallListener) -> None:
        with self._lock:
            self._listeners = tuple(x for x in self._listeners if x is not listener)

    # -- DSPy hooks ------------------------------------------------------------------
    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        listeners = self._listeners
        if not listeners:
            return
        import dspy

        call = LMCall(
            call_id=call_id,
            model=str(getattr(instance, "model", None) or type(instance).__name__),
            job_id=current_job_id(),
            trial=current_trial(),
            params=_params(instance, inputs),
            start_ns=time.time_ns(),
        )
        if self.capture_text:
            call.messages = _text(inputs.get("messages") or inputs.get("prompt"))
        meter = _CallMeter(dspy.settings.usage_tracker)
        ctx = dspy.context(usage_tracker=meter)
        states = [(x, _safely(x.on_start, call)) for x in listeners]
        ctx.__enter__()
        with self._lock:
            self._open[call_id] = _Open(call, meter, ctx, states)

    def on_lm_end(self, call_id: str, outputs: Any | None, exception: Exception | None = None) -> None:
        with self._lock:
            entry = self._open.pop(call_id, None)
        if entry is None:
            return
        try:
            entry.context.__exit__(None, None, None)
        except Exception:  # a context entered elsewhere; the call's numbers still stand
            log.debug("could not leave the per-call usage context", exc_info=True)
        call, usage = entry.call, entry.meter.usage
        call.end_ns = time.time_ns()
        call.usage = usage
        call.input_tokens = usage.prompt_tokens
        call.output_tokens = usage.completion_tokens
        call.cached_input_tokens = entry.meter.cached_input_tokens
        call.cache_hit = exception is None and usage.calls == 0
        call.cost_usd = usage.cost_usd if usage.calls else 0.0
        if exception is not None:
            call.error_type = type(exception).__name__
            call.error = str(exception)[:500]
        if self.capture_text and outputs is not None:
            call.outputs = _text(outputs)
        for listener, state in entry.states:
            _safely(listener.on_end, call, state)


def _safely(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception:
        log.exception("LM-call listener %r failed; the call goes on", getattr(fn, "__self__", fn))
        return None


def _params(instance: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    merged = {**(getattr(instance, "kwargs", None) or {}), **(inputs.get("kwargs") or {})}
    out: dict[str, Any] = {}
    for key in _PARAMS:
        value = merged.get(key)
        if isinstance(value, bool | int | float | str):
            out[key] = value
    return out


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value, default=str, ensure_ascii=False)
        except (TypeError, ValueError):
            text = str(value)
    return text[:_MAX_TEXT]


_callback = LMCallbacks()
_install_lock = threading.Lock()


def callback() -> LMCallbacks:
    """The process's LM-call callback."""
    return _callback


def listeners() -> tuple[LMCallListener, ...]:
    """The listeners now registered."""
    return _callback.listeners


def installed() -> bool:
    """Whether the callback is in DSPy's global callbacks."""
    return any(cb is _callback for cb in _global_callbacks())


def add_listener(listener: LMCallListener, *, capture_text: bool | None = None) -> None:
    """Report every LM call in this process to ``listener``; installs the DSPy callback if needed."""
    _callback.add(listener)
    if capture_text is not None:
        _callback.capture_text = capture_text
    with _install_lock:
        current = _global_callbacks()
        if not any(cb is _callback for cb in current):
            _set_global_callbacks([*current, _callback])


def remove_listener(listener: LMCallListener) -> None:
    """Stop reporting to ``listener`` and close it; the callback leaves DSPy with the last one."""
    _callback.remove(listener)
    if not _callback.listeners:
        with _install_lock:
            current = _global_callbacks()
            if any(cb is _callback for cb in current):
                _set_global_callbacks([cb for cb in current if cb is not _callback])
        _callback.capture_text = False
    try:
        listener.close()
    except Exception:
        log.exception("closing LM-call listener %r failed", listener)


def _settings_module() -> Any:
    return importlib.import_module("dspy.dsp.utils.settings")


def _global_callbacks() -> list[Any]:
    return list(_settings_module().main_thread_config.get("callbacks") or [])


def _set_global_callbacks(callbacks: list[Any]) -> None:
    # Written straight into DSPy's global config, under its lock, rather than through
    # dspy.configure(): configure() makes the calling thread the only one allowed to
    # configure DSPy from then on, which would take that right away from the user.
    module = _settings_module()
    with module.global_lock:
        module.main_thread_config["callbacks"] = callbacks
