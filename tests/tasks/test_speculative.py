"""Speculative bootstrap gives DSPy's sequential demo sets, on the real dspy and the simulator."""

from __future__ import annotations

import random
from typing import Any

import dspy
import pytest
from dspy.teleprompt import BootstrapFewShot

from dmipro.jobs.candidate import demo_dict
from dmipro.lm._sim import sim_lm
from dmipro.lm.usage import metered
from dmipro.tasks._speculative import SpeculativeBootstrapFewShot
from examples.math_qa.program import build as build_one
from examples.math_qa.program import exact_match
from examples.threestage.program import build as build_three
from tests.fixtures.jobs import records


class CountingBootstrap(BootstrapFewShot):  # type: ignore[misc]
    """DSPy's own loop, counting its attempts."""

    attempts = 0

    def _bootstrap_one_example(self, example: Any, round_idx: int = 0) -> bool:
        self.attempts += 1
        return bool(super()._bootstrap_one_example(example, round_idx))


def trainset(seed: int, n: int = 40) -> list[dspy.Example]:
    rows = [dspy.Example(**r).with_inputs("question") for r in records("train", n)]
    random.Random(seed).shuffle(rows)
    return rows


def compile_with(cls: type, build: Any, seed: int, *, sim: dict[str, Any] | None = None,
                 **settings: Any) -> tuple[dict[str, Any], Any, int]:
    settings = {"max_bootstrapped_demos": 4, "max_labeled_demos": 4, "max_rounds": 1, **settings}
    settings.setdefault("metric", exact_match)
    optimizer = cls(**settings)
    lm = sim_lm("sim/math", temperature=0.0, cache=False, **(sim or {}))
    with metered() as meter, dspy.context(lm=lm):
        program = optimizer.compile(build(), teacher=build(), trainset=trainset(seed))
    demos = {name: [demo_dict(d) for d in p.demos] for name, p in program.named_predictors()}
    return demos, optimizer, meter.usage.calls


@pytest.mark.parametrize("build", [build_one, build_three], ids=["one-predictor", "three-predictors"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("max_boot", [1, 4])
def test_the_demo_sets_equal_dspys_sequential_ones(build: Any, seed: int, max_boot: int) -> None:
    sequential, dspy_opt, dspy_calls = compile_with(CountingBootstrap, build, seed,
                                                    max_bootstrapped_demos=max_boot)
    speculative, ours, our_calls = compile_with(SpeculativeBootstrapFewShot, build, seed,
                                                max_bootstrapped_demos=max_boot)
    assert speculative == sequential
    assert any(speculative.values())
    assert ours.attempts == dspy_opt.attempts  # the outcomes used are exactly DSPy's attempts
    # Every call is counted, the speculative ones too: never fewer than DSPy's.
    assert our_calls >= dspy_calls > 0


def test_later_rounds_and_a_threshold_follow_dspy() -> None:
    kwargs = {"max_rounds": 3, "metric_threshold": 1.0}
    sequential, dspy_opt, _ = compile_with(CountingBootstrap, build_three, 5, **kwargs)
    speculative, ours, _ = compile_with(SpeculativeBootstrapFewShot, build_three, 5, **kwargs)
    assert speculative == sequential and ours.attempts == dspy_opt.attempts


def _flaky_metric(example: dspy.Example, prediction: Any, trace: Any = None) -> float:
    if int(example.answer) % 3 == 0:
        raise ValueError(f"metric failed on {example.answer}")
    return exact_match(example, prediction, trace)


def test_errors_are_counted_in_dspys_order() -> None:
    # Enough room for the errors: the same demos as DSPy.
    sequential, dspy_opt, _ = compile_with(CountingBootstrap, build_one, 3, metric=_flaky_metric,
                                           max_errors=50)
    speculative, ours, _ = compile_with(SpeculativeBootstrapFewShot, build_one, 3, metric=_flaky_metric,
                                        max_errors=50)
    assert speculative == sequential and ours.error_count == dspy_opt.error_count > 0
    # One error allowed: both stop at the same (first) failing example.
    with pytest.raises(ValueError) as theirs:
        compile_with(CountingBootstrap, build_one, 3, metric=_flaky_metric, max_errors=1)
    with pytest.raises(ValueError) as mine:
        compile_with(SpeculativeBootstrapFewShot, build_one, 3, metric=_flaky_metric, max_errors=1)
    assert str(mine.value) == str(theirs.value)


def test_the_critical_path_is_shorter_than_dspys_chain() -> None:
    # DSPy's chain is one attempt after another: attempts x calls per attempt (3 here).
    _, dspy_opt, _ = compile_with(CountingBootstrap, build_three, 0)
    _, ours, _ = compile_with(SpeculativeBootstrapFewShot, build_three, 0)
    assert dspy_opt.attempts >= 4 and 0 < ours.depth < 3 * dspy_opt.attempts


def test_the_calls_made_do_not_depend_on_timing() -> None:
    # A redelivered task or a resumed job must count the same calls: which attempts launch
    # follows from the outcomes in order, never from which thread finished first.
    _, _, instant = compile_with(SpeculativeBootstrapFewShot, build_three, 4)
    jittery = {"latency_ms": 5, "latency_dist": "lognormal", "latency_sigma": 1.0}
    _, _, slow = compile_with(SpeculativeBootstrapFewShot, build_three, 4, sim=jittery)
    assert slow == instant
