"""``MIPROv2(executor="celery"|"rq").compile(...)``: what crosses to workers, and what is refused first.

The refusals need no broker: everything is checked before a job row is written or a
message queued. The end-to-end run is in tests/integration/test_compile_remote.py.
"""

from __future__ import annotations

from typing import Any

import dspy
import pytest

import dmipro
from dmipro.errors import OptimizerArgumentError
from dmipro.jobs import JobSpec, JobStore
from dmipro.jobs.runtime import JobRuntime
from dmipro.lm._sim import sim_lm
from dmipro.teleprompt._remote_compile import remote_spec
from examples.math_qa.program import build, exact_match
from examples.multistage.program import PlanAndSolve
from tests.teleprompt._scripted import examples

SMALL = {"auto": None, "num_candidates": 3, "max_bootstrapped_demos": 2, "max_labeled_demos": 2}


def _optimizer(**kwargs: Any) -> dmipro.MIPROv2:
    args = {
        "metric": exact_match,
        "task_model": sim_lm("sim/math", temperature=0.0),
        "prompt_model": sim_lm("sim/math", temperature=1.0),
        "num_threads": 4,
        "executor": "celery",
        **SMALL,
        **kwargs,
    }
    return dmipro.MIPROv2(**args)


def _spec(opt: dmipro.MIPROv2, student: Any = build, **kwargs: Any) -> dict[str, Any]:
    from dmipro.jobs.spec import OptimizerConfig

    return remote_spec(
        opt,
        student,
        trainset=kwargs.pop("trainset", examples("train", 10)),
        valset=kwargs.pop("valset", examples("dev", 10)),
        teacher=kwargs.pop("teacher", None),
        optimizer=OptimizerConfig(auto=None, num_candidates=3, num_trials=2, seed=4),
        backend="celery",
        provide_traceback=kwargs.pop("provide_traceback", None),
    )


def test_refs_examples_lms_and_the_callers_adapter_cross_as_json() -> None:
    with dspy.context(adapter=dspy.JSONAdapter()):
        spec = _spec(_optimizer(), build, provide_traceback=True)
    assert spec["program"] == "examples.math_qa.program:build"
    # A program object whose class is importable and rebuilds it crosses as that class.
    assert _spec(_optimizer(), PlanAndSolve())["program"] == "examples.multistage.program:PlanAndSolve"
    assert spec["metric"] == "examples.math_qa.program:exact_match"
    assert spec["input_keys"] == ["question"] and spec["trainset"][0] == examples("train", 1)[0].toDict()
    assert spec["lm"]["model"] == "sim/math" and spec["lm"]["temperature"] == 0.0
    assert spec["prompt_lm"]["temperature"] == 1.0
    assert spec["optimizer"]["seed"] == 4 and spec["optimizer"]["num_trials"] == 2
    assert spec["dspy_settings"] == {"adapter": "JSONAdapter", "provide_traceback": True}
    # A worker builds its runtime from the stored spec and applies those settings to each task.
    runtime = JobRuntime("remote-settings", JobSpec.model_validate(spec))
    with runtime.context(lm=runtime.task_lm):
        assert isinstance(dspy.settings.adapter, dspy.JSONAdapter)
        assert dspy.settings.provide_traceback is True


def _refused(pattern: str, run: Any) -> None:
    with pytest.raises(OptimizerArgumentError, match=pattern):
        run()
    assert JobStore().list() == []  # nothing written before the refusal


def test_a_non_json_field_is_named_by_split_index_and_field() -> None:
    train = examples("train", 10, gold=True)
    _refused(
        r"trainset\[0\]\.gold is not JSON \(Gold\)",
        lambda: _optimizer().compile(build, trainset=train, valset=examples("dev", 10), num_trials=2),
    )


def test_examples_with_different_input_keys_are_refused() -> None:
    train = examples("train", 10)
    train[3] = train[3].with_inputs("question", "answer")
    _refused(
        r"trainset\[3\] has input keys", lambda: _optimizer().compile(build, trainset=train, num_trials=2)
    )


def test_a_lambda_metric_is_refused() -> None:
    _refused(
        "metric must be importable",
        lambda: _optimizer(metric=lambda e, p, t=None: 1.0).compile(
            build, trainset=examples("train", 10), num_trials=2
        ),
    )


def test_a_program_object_its_reference_does_not_rebuild_is_refused() -> None:
    changed = PlanAndSolve()
    changed.plan.signature = changed.plan.signature.with_instructions("Something else.")
    _refused(
        "differs from what",
        lambda: _optimizer().compile(changed, trainset=examples("train", 10), num_trials=2),
    )


class _Callback(dspy.utils.callback.BaseCallback):  # type: ignore[misc]
    pass


def test_callbacks_and_custom_adapters_in_force_are_refused() -> None:
    def run() -> None:
        _optimizer().compile(build, trainset=examples("train", 10), num_trials=2)

    with dspy.context(callbacks=[_Callback()]):
        _refused("callbacks in force", run)
    with dspy.context(adapter=dspy.JSONAdapter(use_native_function_calling=False)):
        _refused("adapter in force", run)


def test_teacher_settings_and_keys_are_refused() -> None:
    _refused(
        "teacher_settings",
        lambda: _optimizer(teacher_settings={"lm": sim_lm()}).compile(
            build, trainset=examples("train", 10), num_trials=2
        ),
    )
    keyed = dspy.LM("openai/gpt-4o-mini", api_key="sk-test-not-real")
    _refused(
        "holds an API key",
        lambda: _optimizer(task_model=keyed).compile(build, trainset=examples("train", 10), num_trials=2),
    )
