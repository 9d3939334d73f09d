"""New Relic: custom events and metrics of runs, and worker tasks as background transactions.

:func:`enable` uses the agent the process already runs (``newrelic-admin run-program``
or an earlier ``newrelic.agent.initialize()``), or initializes it from
``NEW_RELIC_CONFIG_FILE`` / ``NEW_RELIC_LICENSE_KEY`` and ``NEW_RELIC_APP_NAME``
(``NEW_RELIC_DEVELOPER_MODE=true`` records without a collector). Registration waits up
to ``NEW_RELIC_STARTUP_TIMEOUT`` seconds (the agent's own setting; default 0, i.e.
data recorded before the agent connects is dropped).

Recorded, always with the application passed explicitly so it works outside a
transaction and on any thread:

- custom events ``OptimizationRun`` (one per finished or failed run: scores, trials,
  LM calls, tokens, cost, wall time), ``OptimizationTrial`` (one per trial: kind, score,
  duration), ``SignatureDeployed`` (deploys and rollbacks), ``ABDecision``,
  ``ABRegression`` (the production loop's alert) and ``ABComparison`` (offline);
- per A/B arm, ``Custom/dmipro/ab/<experiment>/<arm>/value`` and ``.../latency_ms``;
- custom metrics ``Custom/dmipro/trial/score``, ``Custom/dmipro/trial/duration``,
  ``Custom/dmipro/run/best_score``, ``Custom/dmipro/run/duration`` and per LM call
  ``Custom/dmipro/lm/calls``, ``.../lm/tokens/input``, ``.../lm/tokens/output``,
  ``.../lm/cost_usd`` (known prices only), ``.../lm/cache_hits``, ``.../lm/errors``.

:func:`background_task` wraps a unit of work (a worker task) in a background
transaction, or a function trace inside one already running (Celery tasks are
transactions of their own under the agent); it costs nothing when the agent is off.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dmipro._imports import guarded
from dmipro.errors import ConfigError
from dmipro.events import Event, Subscriber, bus
from dmipro.lm import callbacks
from dmipro.lm.callbacks import LMCall, LMCallListener
from dmipro.subscribers import scrub

__all__ = [
    "EVENT_TYPES",
    "METRIC_PREFIX",
    "NewRelicHandle",
    "NewRelicSubscriber",
    "agent_active",
    "background_task",
    "enable",
]

log = logging.getLogger(__name__)

METRIC_PREFIX = "Custom/dmipro"
EVENT_TYPES = ("OptimizationRun", "OptimizationTrial", "SignatureDeployed", "ABDecision", "ABRegression",
               "ABComparison")
_MAX_VALUE = 255  # the agent's default limit on a custom event attribute's length


def agent_active() -> bool:
    """Whether the New Relic agent is imported and initialized in this process (cheap)."""
    agent = sys.modules.get("newrelic.agent")
    if agent is None:
        return False
    try:
        return bool(agent.global_settings().enabled)
    except Exception:
        return False


@contextmanager
def background_task(name: str, group: str = "dmipro") -> Iterator[None]:
    """Run the block as a New Relic background transaction ``group/name``; a no-op without the agent."""
    if not agent_active():
        yield
        return
    import newrelic.agent as nr

    if nr.current_transaction() is not None:
        with nr.FunctionTrace(name=name, group=group):
            yield
        return
    with nr.BackgroundTask(nr.application(), name=name, group=group):
        yield


def _attrs(data: dict[str, Any]) -> dict[str, Any]:
    """Event attributes the agent accepts: scrubbed, primitives only, strings cut to its limit."""
    out: dict[str, Any] = {}
    for key, value in scrub(data).items():
        if value is None:
            continue
        if isinstance(value, bool | int | float):
            out[key] = value
        else:
            out[key] = str(value)[:_MAX_VALUE]
    return out


class NewRelicSubscriber(Subscriber, LMCallListener):
    """Records dmipro events and LM calls into a New Relic application; see the module docstring."""

    patterns = ("dspy.optimization.*", "dspy.evaluation.start", "dspy.signature.deployed",
                "dspy.ab.outcome", "dspy.ab.decision", "dspy.ab.regression",
                "dspy.langfuse.comparison_logged")

    def __init__(self, application: Any) -> None:
        self.application = application
        self._lock = threading.Lock()
        self._started: dict[tuple[str | None, int], float] = {}

    def _event(self, event_type: str, data: dict[str, Any]) -> None:
        import newrelic.agent as nr

        nr.record_custom_event(event_type, _attrs(data), application=self.application)

    def _metric(self, name: str, value: float) -> None:
        import newrelic.agent as nr

        nr.record_custom_metric(f"{METRIC_PREFIX}/{name}", value, application=self.application)

    def on_event(self, event: Event) -> None:
        name, data = event.name, dict(event.data)
        if name in ("dspy.optimization.trial_start", "dspy.evaluation.start") and event.trial is not None:
            # A full evaluation has no trial_start; its evaluation starts the clock.
            with self._lock:
                self._started.setdefault((event.job_id, event.trial), time.perf_counter())
        elif name == "dspy.optimization.trial_complete":
            with self._lock:
                key = (event.job_id, event.trial if event.trial is not None else -1)
                started = self._started.pop(key, None)
            duration = None if started is None else time.perf_counter() - started
            self._event("OptimizationTrial", {
                "job_id": event.job_id, "trial": event.trial, "kind": data.get("kind"),
                "score": data.get("score"), "candidate": data.get("candidate"), "duration_s": duration,
            })
            if isinstance(data.get("score"), int | float):
                self._metric("trial/score", float(data["score"]))
            if duration is not None:
                self._metric("trial/duration", duration)
        elif name == "dspy.optimization.complete":
            self._forget(event.job_id)
            baseline, best = data.get("baseline_score"), data.get("best_score")
            gain = float(best) - float(baseline) if isinstance(best, int | float) and \
                isinstance(baseline, int | float) else None
            status = "cancelled" if data.get("stop_reason") == "cancelled" else "succeeded"
            self._event("OptimizationRun", {"job_id": event.job_id, "status": status, "improvement": gain,
                                            **{k: data.get(k) for k in _RUN_FIELDS}})
            if isinstance(best, int | float):
                self._metric("run/best_score", float(best))
            if isinstance(data.get("wall_s"), int | float):
                self._metric("run/duration", float(data["wall_s"]))
        elif name == "dspy.optimization.error":
            self._forget(event.job_id)
            self._event("OptimizationRun", {"job_id": event.job_id, "status": "failed",
                                            "error_type": data.get("error_type"), "error": data.get("error")})
        elif name == "dspy.ab.outcome":
            arm = f"ab/{data.get('experiment') or data.get('program')}/{data.get('arm')}"
            if isinstance(data.get("value"), int | float):
                self._metric(f"{arm}/value", float(data["value"]))
            if isinstance(data.get("latency_ms"), int | float):
                self._metric(f"{arm}/latency_ms", float(data["latency_ms"]))
        elif name == "dspy.ab.decision":
            self._event("ABDecision", {k: data.get(k) for k in (
                "experiment", "program", "decision", "lift", "lift_ci_low", "lift_ci_high", "p_value",
                "units", "control_version", "treatment_version", "srm_p_value")})
        elif name == "dspy.ab.regression":
            self._event("ABRegression", {k: data.get(k) for k in (
                "program", "version", "action", "rolled_back_to", "reference_mean", "recent_mean", "diff",
                "p_value", "recent_n")})
        elif name == "dspy.langfuse.comparison_logged":
            a, b = data.get("a") or {}, data.get("b") or {}
            self._event("ABComparison", {
                "a": a.get("version"), "a_score": a.get("score"), "b": b.get("version"),
                "b_score": b.get("score"), "diff": data.get("diff"), "p_value": data.get("p_value"),
                "n": data.get("n"), "better": data.get("better"), "split": data.get("split")})
        elif name == "dspy.signature.deployed":
            self._event("SignatureDeployed", {
                "name": data.get("name"), "version": data.get("version"),
                "previous_version": data.get("previous_version"), "action": data.get("action"),
                "actor": data.get("actor"), "job_id": event.job_id,
            })

    def _forget(self, job_id: str | None) -> None:
        with self._lock:
            for key in [k for k in self._started if k[0] == job_id]:
                del self._started[key]

    def on_end(self, call: LMCall, state: Any) -> None:
        self._metric("lm/calls", 1)
        if call.cache_hit:
            self._metric("lm/cache_hits", 1)
        else:
            self._metric("lm/tokens/input", call.input_tokens)
            self._metric("lm/tokens/output", call.output_tokens)
        if call.cost_usd:
            self._metric("lm/cost_usd", call.cost_usd)
        if call.error_type is not None:
            self._metric("lm/errors", 1)


_RUN_FIELDS = ("baseline_score", "best_score", "trials", "lm_calls", "tokens", "cost_usd", "wall_s",
               "stop_reason", "program_path")


class NewRelicHandle:
    """What :func:`enable` switched on; ``close()`` switches it off (the agent keeps running)."""

    def __init__(self, subscriber: NewRelicSubscriber) -> None:
        self.subscriber = subscriber

    def force_flush(self) -> None:
        """Nothing to do: the agent harvests on its own schedule and at shutdown."""

    def close(self) -> None:
        callbacks.remove_listener(self.subscriber)
        bus.remove(self.subscriber)


def enable() -> NewRelicHandle:
    """Record runs into New Relic, initializing the agent from its environment if needed."""
    with guarded(extra="newrelic", purpose="subscriber 'newrelic'"):
        import newrelic.agent as nr
        import newrelic.config
    if not getattr(newrelic.config, "_configuration_done", False) and not agent_active():
        configured = any(os.environ.get(v) for v in ("NEW_RELIC_LICENSE_KEY", "NEW_RELIC_CONFIG_FILE")) or \
            os.environ.get("NEW_RELIC_DEVELOPER_MODE", "").lower() in ("1", "true", "on", "yes")
        if not configured:
            raise ConfigError(
                "subscriber 'newrelic' needs the agent configured: set NEW_RELIC_LICENSE_KEY and "
                "NEW_RELIC_APP_NAME (or NEW_RELIC_CONFIG_FILE), or start the process with newrelic-admin"
            )
        try:
            nr.initialize()
        except Exception as exc:
            raise ConfigError(f"the New Relic agent could not be initialized: {scrub(str(exc))}") from exc
    application = nr.register_application()
    subscriber = NewRelicSubscriber(application)
    bus.add(subscriber)
    callbacks.add_listener(subscriber)
    return NewRelicHandle(subscriber)
