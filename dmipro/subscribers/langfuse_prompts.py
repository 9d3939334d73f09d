"""Registry → Langfuse prompts: each registered version as a Langfuse chat prompt version.

A registered version becomes one Langfuse chat prompt version per predictor — system
message = instructions, then the demos as user/assistant turns, the registry data in
``config`` — labelled ``v<version>``. One prompt per predictor, named after the
registered name (``name/predictor`` when the program has several). Deploy and
rollback move the ``production`` label.

:class:`PromptSync` does it from the registry's events; the Langfuse subscriber
(:mod:`dmipro.subscribers.langfuse`) hands them over. The REST calls run in order on a
background thread, so an event handler never waits on the network; everything sent
passes through the secret scrubber.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from dmipro.events import Event
from dmipro.registry import format_spec, get
from dmipro.storage.record import state_predictors
from dmipro.subscribers import scrub

__all__ = ["PRODUCTION", "PromptSync", "prompt_names"]

log = logging.getLogger(__name__)

PRODUCTION = "production"
"""The Langfuse label of the deployed version."""


def prompt_names(name: str, predictors: list[str]) -> dict[str, str]:
    """Langfuse prompt name per predictor of registered program ``name``."""
    if len(predictors) == 1:
        return {predictors[0]: name}
    return {p: f"{name}/{p}" for p in predictors}


class _Outbox:
    """A background thread running REST calls in order, so event handlers never wait on the network."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Callable[[], object] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="dmipro-langfuse", daemon=True)
        self._thread.start()

    def put(self, fn: Callable[[], object]) -> None:
        self._queue.put(fn)

    def flush(self, timeout: float = 30.0) -> bool:
        done = threading.Event()
        self._queue.put(done.set)
        return done.wait(timeout)

    def close(self, timeout: float = 30.0) -> None:
        self.flush(timeout)
        self._queue.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            fn = self._queue.get()
            if fn is None:
                return
            try:
                fn()
            except Exception as exc:
                log.warning("Langfuse request failed (%s); the run goes on",
                            scrub(f"{type(exc).__name__}: {exc}"))


class PromptSync:
    """Pushes registered versions to Langfuse as prompts and moves the ``production`` label on deploy.

    ``client`` is a ``langfuse.Langfuse``. :meth:`on_event` only queues the REST calls
    (thread-safe); :meth:`flush` waits for them, :meth:`close` too and stops the thread.
    """

    def __init__(self, client: Any) -> None:
        self.client = client
        self._lock = threading.Lock()
        self._versions: dict[tuple[str, int], int] = {}
        """Langfuse prompt version per (prompt name, registry version), as pushed or found."""
        self._outbox = _Outbox()

    def on_event(self, event: Event) -> None:
        """Queue the Langfuse calls for ``dspy.registry.register`` and ``dspy.signature.deployed``."""
        data = dict(event.data)
        if event.name == "dspy.registry.register":
            name, version = str(data["name"]), int(data["version"])
            self._outbox.put(lambda: self._push_prompt(name, version, data, event.job_id))
        elif event.name == "dspy.signature.deployed":
            name, version = str(data["name"]), int(data["version"])
            self._outbox.put(lambda: self._label_production(name, version))

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every queued prompt change is sent (or failed)."""
        self._outbox.flush(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Send what is queued, then stop the background thread."""
        self._outbox.close(timeout)

    def _record(self, name: str, version: int) -> Any:
        return get(format_spec(name, version))

    def _push_prompt(self, name: str, version: int, data: dict[str, Any],
                     job_id: str | None) -> dict[str, int]:
        """Create the Langfuse prompt versions of ``name@version``; returns Langfuse version per prompt."""
        record = self._record(name, version)
        predictors = state_predictors(record.program)
        names = prompt_names(name, list(predictors))
        pushed: dict[str, int] = {}
        for predictor, state in predictors.items():
            fields = record.metadata.signatures.get(predictor)
            inputs = list(fields.inputs) if fields else []
            outputs = list(fields.outputs) if fields else []
            messages = _chat_messages(state, inputs, outputs)
            config = scrub({
                "dmipro": {
                    "name": name, "version": version, "predictor": predictor, "job_id": job_id,
                    "program_id": data.get("program_id"), "best_score": data.get("best_score"),
                    "baseline_score": data.get("baseline_score"), "program_ref": data.get("program_ref"),
                    "inputs": inputs, "outputs": outputs, "demos": len(state.get("demos") or []),
                }
            })
            prompt = self.client.create_prompt(
                name=names[predictor], prompt=scrub(messages), type="chat", labels=[f"v{version}"],
                tags=["dmipro"], config=config,
                commit_message=f"{name}@{version}" + (f" from job {job_id}" if job_id else ""))
            pushed[names[predictor]] = int(prompt.version)
            with self._lock:
                self._versions[(names[predictor], version)] = int(prompt.version)
        return pushed

    def _label_production(self, name: str, version: int) -> None:
        record = self._record(name, version)
        for prompt_name in prompt_names(name, list(state_predictors(record.program))).values():
            with self._lock:
                lf_version = self._versions.get((prompt_name, version))
            if lf_version is None:
                lf_version = self._find_version(prompt_name, version)
            if lf_version is None:
                lf_version = self._push_prompt(name, version, {}, record.metadata.job_id)[prompt_name]
            self.client.update_prompt(name=prompt_name, version=lf_version,
                                      new_labels=[PRODUCTION, f"v{version}"])

    def _find_version(self, prompt_name: str, version: int) -> int | None:
        try:
            prompt = self.client.get_prompt(prompt_name, label=f"v{version}", type="chat",
                                            cache_ttl_seconds=0, max_retries=0)
        except Exception:
            return None
        found = int(prompt.version)
        with self._lock:
            self._versions[(prompt_name, version)] = found
        return found


def _chat_messages(state: dict[str, Any], inputs: list[str], outputs: list[str]) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": str(state.get("signature", {}).get("instructions") or "")}]
    for demo in state.get("demos") or []:
        ins = inputs or [k for k in demo if k not in outputs and k != "augmented"]
        outs = outputs or [k for k in demo if k not in ins and k != "augmented"]
        user = "\n".join(f"{k}: {demo[k]}" for k in ins if k in demo)
        assistant = "\n".join(f"{k}: {demo[k]}" for k in outs if k in demo)
        if user:
            messages.append({"role": "user", "content": user})
        if assistant:
            messages.append({"role": "assistant", "content": assistant})
    return messages
