"""The LM-call callback: each call's own usage, next to the user's DSPy callbacks, never in the way."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import dspy
import pytest
from dspy.utils.callback import BaseCallback

from dmipro.events import correlate
from dmipro.lm import callbacks
from dmipro.lm._sim import sim_lm
from dmipro.lm.callbacks import LMCall, LMCallListener
from dmipro.lm.usage import metered


class Recorder(LMCallListener):
    def __init__(self) -> None:
        self.calls: list[LMCall] = []
        self.closed = False
        self._lock = threading.Lock()

    def on_end(self, call: LMCall, state: Any) -> None:
        with self._lock:
            self.calls.append(call)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    rec = Recorder()
    callbacks.add_listener(rec)
    yield rec
    callbacks.remove_listener(rec)


def _ask(question: str) -> None:
    dspy.Predict("question -> answer")(question=question)


def test_without_listeners_the_callback_is_not_installed() -> None:
    assert callbacks.listeners() == ()
    assert not callbacks.installed()


def test_each_call_gets_its_own_usage_across_threads(recorder: Recorder) -> None:
    lm = sim_lm(temperature=0.0)
    meters: dict[int, Any] = {}

    def work(i: int) -> None:
        with metered() as meter, dspy.context(lm=lm), correlate(job_id=f"job-{i}", trial=i):
            _ask(f"Ada has {i} apples and buys {i * 7 + 3} more. How many apples does Ada have now?")
        meters[i] = meter

    threads = [threading.Thread(target=work, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(recorder.calls) == 12
    for call in recorder.calls:
        assert call.job_id is not None and call.trial is not None
        usage = meters[call.trial].usage
        assert call.job_id == f"job-{call.trial}"
        assert (call.input_tokens, call.output_tokens) == (usage.prompt_tokens, usage.completion_tokens)
        assert call.cost_usd == usage.cost_usd and call.cost_usd is not None and call.cost_usd > 0
        assert not call.cache_hit and call.error_type is None
        assert call.model == "sim/math" and call.params["temperature"] == 0.0
        assert call.end_ns >= call.start_ns


def test_async_calls_are_reported_too(recorder: Recorder) -> None:
    lm = sim_lm()

    async def ask() -> None:
        with metered() as meter:
            await lm.acall("What is 2 + 3?")
        assert recorder.calls[-1].input_tokens == meter.usage.prompt_tokens > 0

    asyncio.run(ask())
    assert len(recorder.calls) == 1


def test_the_users_callbacks_stay_and_keep_working() -> None:
    seen: list[str] = []

    class Mine(BaseCallback):  # type: ignore[misc]
        def on_lm_end(self, call_id: str, outputs: Any, exception: Exception | None = None) -> None:
            seen.append(call_id)

    mine = Mine()
    settings_module = callbacks._settings_module()
    before = list(settings_module.main_thread_config["callbacks"])
    settings_module.main_thread_config["callbacks"] = [*before, mine]
    rec = Recorder()
    try:
        callbacks.add_listener(rec)
        callbacks.add_listener(rec)  # twice: still one callback, one listener
        assert dspy.settings.callbacks == [*before, mine, callbacks.callback()]
        with dspy.context(lm=sim_lm()):
            _ask("What is 2 + 3?")
        assert len(seen) == 1 and len(rec.calls) == 1
        callbacks.remove_listener(rec)
        assert dspy.settings.callbacks == [*before, mine]
        assert rec.closed
    finally:
        settings_module.main_thread_config["callbacks"] = before


def test_a_failing_listener_never_breaks_the_call(recorder: Recorder,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    class Broken(LMCallListener):
        def on_start(self, call: LMCall) -> Any:
            raise RuntimeError("listener start failed")

        def on_end(self, call: LMCall, state: Any) -> None:
            raise RuntimeError("listener end failed")

    broken = Broken()
    callbacks.add_listener(broken)
    try:
        with metered() as meter, dspy.context(lm=sim_lm()):
            prediction = dspy.Predict("question -> answer")(question="What is 2 + 3?")
    finally:
        callbacks.remove_listener(broken)
    assert prediction.answer
    assert meter.usage.calls == 1
    assert len(recorder.calls) == 1 and recorder.calls[0].input_tokens == meter.usage.prompt_tokens
    assert "listener end failed" in caplog.text


def test_a_failed_call_is_reported_with_its_error(recorder: Recorder) -> None:
    lm = sim_lm(server_error_rate=1.0, num_retries=0)
    with dspy.context(lm=lm), pytest.raises(Exception):  # noqa: B017  (whatever the LM raises)
        _ask("What is 2 + 3?")
    (call,) = recorder.calls
    assert call.error_type is not None and call.error
    assert not call.cache_hit
