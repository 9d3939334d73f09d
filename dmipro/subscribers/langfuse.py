"""Langfuse: one trace per optimization run, trial scores, and registry versions as prompts.

Enabled by :func:`enable` when ``LANGFUSE_PUBLIC_KEY`` and ``LANGFUSE_SECRET_KEY`` are
set (``LANGFUSE_BASE_URL`` picks the server); without them it is off, silently.

- **Trace.** A run's trace id is ``Langfuse.create_trace_id(seed=job_id)``, so every
  process that works on the job, and a resumed coordinator, writes into the same trace.
  It holds the run (root), its phases (bootstrap, propose, search), one observation per
  trial, and a generation per LM call (model, tokens, cost; text only with
  ``Settings.capture_text``). Run, phase and trial observations have ids derived from
  the job id too, so an LM call in a remote worker finds its trial by the trial number
  alone; a call outside any trial hangs under the phase (in the coordinator's process)
  or the run.
- **Scores.** Each trial's score on its observation; ``baseline_score``, ``best_score``
  and ``improvement`` (with a comment comparing them) on the trace.
- **A/B.** Outcomes, decisions, regressions and offline comparisons as scores tagged
  with experiment and arm.
- **Prompts.** Each registered version becomes a Langfuse chat prompt version, and
  deploy and rollback move the ``production`` label: :mod:`dmipro.subscribers.langfuse_prompts`,
  fed by this subscriber's registry events.

Langfuse gets a tracer provider of its own, so the application's OpenTelemetry spans
are not sent to Langfuse and Langfuse's are not sent elsewhere. Everything sent passes
through the secret scrubber; the trace is flushed at the end of each run.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from dmipro._imports import guarded
from dmipro.events import Event, Subscriber, bus
from dmipro.lm import callbacks
from dmipro.lm.callbacks import LMCall, LMCallListener
from dmipro.subscribers import scrub
from dmipro.subscribers.langfuse_prompts import PRODUCTION, PromptSync, prompt_names

__all__ = [
    "PRODUCTION",
    "LangfuseHandle",
    "LangfuseSubscriber",
    "enable",
    "observation_id",
    "prompt_names",
    "trace_id",
]

log = logging.getLogger(__name__)

_next_span_id: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "dmipro_langfuse_span_id", default=None
)


def trace_id(job_id: str) -> str:
    """The Langfuse trace id of job ``job_id``'s run (``Langfuse.create_trace_id(seed=job_id)``)."""
    return hashlib.sha256(job_id.encode("utf-8")).digest()[:16].hex()


def observation_id(job_id: str, *parts: object) -> str:
    """The observation id of the run (no parts), a phase (``"phase", name``) or a trial (``"trial", n``)."""
    seed = ":".join([job_id, *(str(p) for p in parts)] if parts else [job_id, "run"])
    digest = hashlib.sha256(seed.encode("utf-8")).digest()[:8]
    return (digest if any(digest) else b"\x00" * 7 + b"\x01").hex()


def _id_generator() -> Any:
    """Random ids, except the span id a caller asked for through ``_next_span_id``."""
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class _Seeded(RandomIdGenerator):
        def generate_span_id(self) -> int:
            wanted = _next_span_id.get()
            return wanted if wanted is not None else int(super().generate_span_id())

    return _Seeded()


@dataclass
class _Run:
    job_id: str
    root: Any
    phase: str | None = None
    phases: dict[str, Any] = field(default_factory=dict)
    trials: dict[int, Any] = field(default_factory=dict)


class LangfuseSubscriber(Subscriber, LMCallListener):
    """Builds the run's Langfuse trace from dmipro events and LM calls; see the module docstring.

    ``client`` is a ``langfuse.Langfuse`` whose tracer provider uses :func:`_id_generator`.
    Thread-safe: events arrive on the coordinator's thread, LM calls on task threads.
    """

    patterns = ("dspy.optimization.*", "dspy.evaluation.*", "dspy.registry.*", "dspy.signature.*",
                "dspy.ab.*", "dspy.langfuse.*")

    def __init__(self, client: Any, *, capture_text: bool = False, public_key: str | None = None) -> None:
        self.client = client
        self.capture_text = capture_text
        self.public_key = public_key
        self._lock = threading.RLock()
        self._runs: dict[str, _Run] = {}
        self._compared: set[str] = set()
        self.prompts = PromptSync(client)
        self._closed = False

    # -- observations ------------------------------------------------------------------
    def _start(self, job_id: str, name: str, *, span_id: str | None, parent_id: str | None,
               **kwargs: Any) -> Any:
        """Start an observation in the job's trace with the given (or a random) id and parent."""
        from opentelemetry import trace

        token = _next_span_id.set(int(span_id, 16) if span_id else None)
        try:
            if parent_id is None:
                return self.client.start_observation(trace_context={"trace_id": trace_id(job_id)}, name=name,
                                                     **kwargs)
            parent = trace.NonRecordingSpan(trace.SpanContext(
                trace_id=int(trace_id(job_id), 16), span_id=int(parent_id, 16), is_remote=False,
                trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED)))
            with trace.use_span(parent):
                return self.client.start_observation(name=name, **kwargs)
        finally:
            _next_span_id.reset(token)

    def _open_phase(self, run: _Run, phase: str) -> None:
        if run.phase == phase:
            return
        self._close_phase(run)
        run.phases[phase] = self._start(
            run.job_id, f"dmipro.phase.{phase}", span_id=observation_id(run.job_id, "phase", phase),
            parent_id=observation_id(run.job_id), as_type="span")
        run.phase = phase

    def _close_phase(self, run: _Run, **update: Any) -> None:
        if run.phase is None:
            return
        obs = run.phases.pop(run.phase)
        if update:
            obs.update(**update)
        obs.end()
        run.phase = None

    def _trial(self, run: _Run, trial: int, data: dict[str, Any]) -> Any:
        obs = run.trials.get(trial)
        if obs is None:
            # The baseline's evaluation may start while bootstrap and proposal still run; it
            # belongs to the search phase all the same (its id is known before it opens).
            if run.phase not in ("bootstrap", "propose"):
                self._open_phase(run, "search")
            obs = run.trials[trial] = self._start(
                run.job_id, f"dmipro.trial {trial}", span_id=observation_id(run.job_id, "trial", trial),
                parent_id=observation_id(run.job_id, "phase", "search"), as_type="span",
                input=data, metadata={"trial": trial})
        return obs

    # -- events --------------------------------------------------------------------------
    def on_event(self, event: Event) -> None:
        name, data, job = event.name, dict(event.data), event.job_id
        if name == "dspy.signature.optimized":
            if job is not None:
                with self._lock:
                    self._compare(job, data.get("baseline_score"), data.get("best_score"))
            return
        if name.startswith("dspy.registry.") or name.startswith("dspy.signature."):
            self.prompts.on_event(event)
            return
        if name.startswith("dspy.ab.") or name.startswith("dspy.langfuse."):
            self._ab_event(event)
            return
        if job is None:
            return
        with self._lock:
            if name == "dspy.optimization.start":
                self._start_run(job, data)
                return
            run = self._runs.get(job)
            if run is None:
                return
            if name == "dspy.optimization.bootstrap_complete":
                self._open_phase(run, "bootstrap")
                self._close_phase(run, output=data)
                self._open_phase(run, "propose")
            elif name == "dspy.optimization.instruction_proposal_complete":
                self._open_phase(run, "propose")
                self._close_phase(run, output=data)
                self._open_phase(run, "search")
            elif name == "dspy.optimization.trial_start" and event.trial is not None:
                self._trial(run, event.trial, {"kind": data.get("kind"), "candidate": data.get("candidate")})
            elif name == "dspy.evaluation.start" and event.trial is not None:
                self._trial(run, event.trial, {"candidate": data.get("candidate"), "n": data.get("n")})
            elif name == "dspy.evaluation.batch_complete" and event.trial is not None:
                obs = run.trials.get(event.trial)
                if obs is not None:
                    obs.update(metadata={"trial": event.trial, "evaluation": data})
            elif name == "dspy.optimization.trial_complete" and event.trial is not None:
                self._finish_trial(run, event.trial, data)
            elif name == "dspy.optimization.complete":
                self._finish_run(run, data, error=None)
            elif name == "dspy.optimization.error":
                self._finish_run(run, data, error=str(data.get("error") or data.get("error_type")))

    def _start_run(self, job: str, data: dict[str, Any]) -> None:
        from langfuse import propagate_attributes

        old = self._runs.pop(job, None)
        if old is not None:
            self._end_all(old)
        with propagate_attributes(trace_name=f"dmipro optimize {job}", session_id=job,
                                  tags=["dmipro", str(data.get("optimizer") or "MIPROv2")],
                                  metadata={"job_id": job, "executor": str(data.get("executor"))}):
            root = self._start(job, "dmipro.optimize", span_id=observation_id(job), parent_id=None,
                               as_type="chain", input=data, metadata={"job_id": job})
        run = self._runs[job] = _Run(job, root)
        self._open_phase(run, "bootstrap")

    def _finish_trial(self, run: _Run, trial: int, data: dict[str, Any]) -> None:
        obs = self._trial(run, trial, {"kind": data.get("kind"), "candidate": data.get("candidate")})
        run.trials.pop(trial, None)
        score = data.get("score")
        obs.update(output={"score": score, "kind": data.get("kind"), "candidate": data.get("candidate")})
        obs.end()
        if isinstance(score, int | float):
            self.client.create_score(
                name="trial_score", value=float(score), trace_id=trace_id(run.job_id),
                observation_id=observation_id(run.job_id, "trial", trial), data_type="NUMERIC",
                comment=f"{data.get('kind')} trial {trial}: {data.get('candidate')}",
                metadata={"trial": trial, "kind": str(data.get("kind"))})

    def _finish_run(self, run: _Run, data: dict[str, Any], *, error: str | None) -> None:
        self._runs.pop(run.job_id, None)
        level = {"level": "ERROR", "status_message": error} if error else {}
        for obs in run.trials.values():
            if level:
                obs.update(**level)
            obs.end()
        run.trials.clear()
        self._close_phase(run, **level)
        run.root.update(output=data, **level)
        run.root.end()
        if error is None:
            self._compare(run.job_id, data.get("baseline_score"), data.get("best_score"),
                          trials=data.get("trials"))
        threading.Thread(target=self._flush_quietly, name="dmipro-langfuse-flush", daemon=True).start()

    def _compare(self, job: str, baseline: Any, best: Any, *, trials: Any = None) -> None:
        """Baseline and optimized scores side by side on the run's trace (once per job)."""
        numbers = isinstance(baseline, int | float) and isinstance(best, int | float)
        if not numbers or job in self._compared:
            return
        self._compared.add(job)
        tid = trace_id(job)
        gain = float(best) - float(baseline)
        comment = (f"baseline {float(baseline):.2f} -> optimized {float(best):.2f} "
                   f"({gain:+.2f} points{f' over {trials} trials' if trials is not None else ''})")
        for name, value in (("baseline_score", baseline), ("best_score", best), ("improvement", gain)):
            self.client.create_score(name=name, value=float(value), trace_id=tid, data_type="NUMERIC",
                                     comment=comment)

    def _end_all(self, run: _Run) -> None:
        for obs in [*run.trials.values(), *run.phases.values(), run.root]:
            try:
                obs.end()
            except Exception:
                log.debug("ending a Langfuse observation failed", exc_info=True)

    def _flush_quietly(self) -> None:
        try:
            self.client.flush()
        except Exception as exc:
            log.warning("Langfuse flush failed (%s); the run goes on", scrub(f"{type(exc).__name__}: {exc}"))

    # -- LM calls -----------------------------------------------------------------------
    def on_start(self, call: LMCall) -> Any:
        job = call.job_id
        if job is None:
            return None
        if call.trial is not None:
            parent = observation_id(job, "trial", call.trial)
        else:
            with self._lock:
                run = self._runs.get(job)
                phase = run.phase if run is not None else None
            parent = observation_id(job, "phase", phase) if phase else observation_id(job)
        metadata: dict[str, Any] = {"job_id": job}
        if call.trial is not None:
            metadata["trial"] = call.trial
        return self._start(
            job, f"lm {call.model}", span_id=None, parent_id=parent, as_type="generation", model=call.model,
            model_parameters={k: v for k, v in call.params.items() if isinstance(v, str | int | float)},
            input=call.messages if self.capture_text else None, metadata=metadata)

    def on_end(self, call: LMCall, state: Any) -> None:
        if state is None:
            return
        update: dict[str, Any] = {
            "usage_details": {"input": call.input_tokens, "output": call.output_tokens,
                              "total": call.input_tokens + call.output_tokens},
            "metadata": {"job_id": call.job_id, "trial": call.trial, "cache_hit": call.cache_hit,
                         "cost_known": call.cost_usd is not None},
        }
        if call.cost_usd is not None:
            update["cost_details"] = {"total": call.cost_usd}
        if self.capture_text and call.outputs is not None:
            update["output"] = call.outputs
        if call.error_type is not None:
            update.update(level="ERROR", status_message=f"{call.error_type}: {call.error}")
        state.update(**update)
        state.end(end_time=call.end_ns)

    # -- A/B ----------------------------------------------------------------------------
    def _ab_event(self, event: Event) -> None:
        """Outcomes, decisions, regressions and offline comparisons as scores tagged with experiment, arm.

        One trace per experiment (``ab:<experiment>``), per monitored program
        (``ab:monitor:<program>``) and per offline pair; each score's metadata names the
        registry version and the Langfuse prompt label (``v<version>``) the registry pushed.
        """
        data = dict(event.data)
        program = str(data.get("program") or "")
        if event.name == "dspy.ab.outcome" and isinstance(data.get("value"), int | float):
            experiment = data.get("experiment")
            tid = trace_id(f"ab:{experiment}" if experiment else f"ab:monitor:{program}")
            version = data.get("version")
            self.client.create_score(
                name=str(data.get("metric") or "outcome"), value=float(data["value"]), trace_id=tid,
                data_type="NUMERIC",
                comment=f"{experiment or 'production'} / {data.get('arm')}: {program}@{version}",
                # The registry pushes each version as prompt(s) named after the program, labelled v<N>.
                metadata={"experiment": experiment, "arm": data.get("arm"), "program": program,
                          "version": version, "prompt_name": program, "prompt_label": f"v{version}"})
        elif event.name == "dspy.ab.decision" and isinstance(data.get("lift"), int | float):
            experiment = str(data.get("experiment"))
            self.client.create_score(
                name="ab_lift", value=float(data["lift"]), trace_id=trace_id(f"ab:{experiment}"),
                data_type="NUMERIC",
                comment=f"decision {data.get('decision')}: {program}@{data.get('treatment_version')} vs "
                        f"@{data.get('control_version')}, p={data.get('p_value')}",
                metadata={"experiment": experiment, "decision": data.get("decision"),
                          "ci_low": data.get("lift_ci_low"), "ci_high": data.get("lift_ci_high")})
        elif event.name == "dspy.ab.regression" and isinstance(data.get("diff"), int | float):
            self.client.create_score(
                name="ab_regression", value=float(data["diff"]), trace_id=trace_id(f"ab:monitor:{program}"),
                data_type="NUMERIC",
                comment=f"{data.get('spec')} regressed ({data.get('action')}), p={data.get('p_value')}",
                metadata={"program": program, "version": data.get("version"), "action": data.get("action"),
                          "prompt_label": f"v{data.get('version')}"})
        elif event.name == "dspy.langfuse.comparison_logged":
            a, b = data.get("a") or {}, data.get("b") or {}
            tid = trace_id(f"ab:offline:{a.get('version')}:{b.get('version')}:{data.get('split')}")
            comment = (f"{a.get('version')} {a.get('score')} vs {b.get('version')} {b.get('score')} "
                       f"on {data.get('n')} {data.get('split')} examples, "
                       f"{data.get('test')} p={data.get('p_value')}")
            for name, value in (("offline_a_score", a.get("score")), ("offline_b_score", b.get("score")),
                                ("offline_diff", data.get("diff"))):
                if isinstance(value, int | float):
                    meta = {"a": a.get("version"), "b": b.get("version"), "better": data.get("better")}
                    self.client.create_score(name=name, value=float(value), trace_id=tid,
                                             data_type="NUMERIC", comment=comment, metadata=meta)
        else:
            return
        if event.name != "dspy.ab.outcome":  # outcomes are many: the SDK batches them; the rest go now
            threading.Thread(target=self._flush_quietly, name="dmipro-langfuse-flush", daemon=True).start()

    # -- lifetime -----------------------------------------------------------------------
    def flush(self, timeout: float = 30.0) -> None:
        """Send everything queued: prompt changes, observations, scores."""
        self.prompts.flush(timeout)
        self._flush_quietly()

    def close(self) -> None:
        """End open observations, send everything and shut the client down (once)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            runs = list(self._runs.values())
            self._runs.clear()
        for run in runs:
            self._end_all(run)
        self.prompts.close()
        try:
            self.client.shutdown()
        except Exception as exc:
            log.warning("Langfuse shutdown failed (%s)", scrub(f"{type(exc).__name__}: {exc}"))
        _forget_resources(self.public_key)


def _forget_resources(public_key: str | None) -> None:
    """Drop the SDK's per-key singleton, shut down now, so a later enable() gets a working client."""
    try:
        from langfuse._client.resource_manager import LangfuseResourceManager

        with LangfuseResourceManager._lock:
            LangfuseResourceManager._instances.pop(public_key or "", None)
    except Exception:
        log.debug("could not reset the Langfuse client registry", exc_info=True)


class LangfuseHandle:
    """What :func:`enable` switched on; ``close()`` flushes and switches it off again."""

    def __init__(self, subscriber: LangfuseSubscriber) -> None:
        self.subscriber = subscriber

    def force_flush(self) -> None:
        self.subscriber.flush()

    def close(self) -> None:
        callbacks.remove_listener(self.subscriber)
        bus.remove(self.subscriber)


def _mask(*, data: Any, **_: Any) -> Any:
    return scrub(data)


def enable(*, capture_text: bool = False) -> LangfuseHandle | None:
    """Switch Langfuse on when its keys are set; None (and no warning) when they are not."""
    if not (os.environ.get("LANGFUSE_PUBLIC_KEY") and os.environ.get("LANGFUSE_SECRET_KEY")):
        return None
    with guarded(extra="langfuse", purpose="subscriber 'langfuse'"):
        from langfuse import Langfuse
        from opentelemetry.sdk.trace import TracerProvider
    client = Langfuse(tracer_provider=TracerProvider(id_generator=_id_generator()),
                      should_export_span=lambda span: True, mask=_mask)
    subscriber = LangfuseSubscriber(client, capture_text=capture_text,
                                    public_key=os.environ["LANGFUSE_PUBLIC_KEY"])
    bus.add(subscriber)
    callbacks.add_listener(subscriber, capture_text=capture_text or None)
    return LangfuseHandle(subscriber)
