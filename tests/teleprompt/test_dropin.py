"""``dmipro.MIPROv2`` against ``dspy.MIPROv2``, side by side, on the same scenarios.

Each test runs one scenario with both optimizers (simulated LMs that record their calls,
no network) and asserts that what a DSPy user observes is the same: who gets called, with
which settings, which objects reach the metric, what comes back, what is left behind.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dspy
import pytest

import dmipro
from dmipro.config import reload_settings
from examples.math_qa.program import build, exact_match
from tests.teleprompt._scripted import CALLS, TEACHER_CALLS, CountingTeacher, examples, recording_lm

IMPLS = ("dspy", "dmipro")

SMALL = {"auto": None, "num_candidates": 4, "max_bootstrapped_demos": 2, "max_labeled_demos": 2}


def optimizer(impl: str, metric: Callable[..., Any] = exact_match, **kwargs: Any) -> Any:
    """``dspy.MIPROv2`` or ``dmipro.MIPROv2`` with the same arguments and recording LMs."""
    args = {
        "metric": metric,
        "task_model": recording_lm(f"task-{impl}"),
        "prompt_model": recording_lm(f"prompt-{impl}", temperature=1.0),
        "num_threads": 4,
        **SMALL,
        **kwargs,
    }
    if impl == "dspy":
        return dspy.MIPROv2(**args)
    return dmipro.MIPROv2(**args, executor="thread")


def compile_small(opt: Any, *, gold: bool = False, **kwargs: Any) -> Any:
    """Two full-evaluation trials on 10 train / 10 val examples."""
    args: dict[str, Any] = {"num_trials": 2, "minibatch": False}
    args.update(kwargs)
    return opt.compile(
        build(), trainset=examples("train", 10, gold=gold), valset=examples("dev", 10, gold=gold), **args
    )


def both(scenario: Callable[[str], Any]) -> dict[str, Any]:
    return {impl: scenario(impl) for impl in IMPLS}


# -- the table's rows ------------------------------------------------------------------------


def test_teacher_program_object_bootstraps_the_demos() -> None:
    def scenario(impl: str) -> int:
        TEACHER_CALLS.pop(impl, None)
        compile_small(optimizer(impl), teacher=CountingTeacher(impl))
        return TEACHER_CALLS[impl]

    runs = both(scenario)
    assert runs["dspy"] > 0
    assert runs["dmipro"] > 0


def test_teacher_settings_lm_bootstraps_the_demos() -> None:
    def scenario(impl: str) -> int:
        strong = recording_lm(f"strong-{impl}")
        compile_small(optimizer(impl, teacher_settings={"lm": strong}))
        return len(CALLS[f"strong-{impl}"])

    runs = both(scenario)
    assert runs["dspy"] > 0
    assert runs["dmipro"] > 0


class _LMCallCounter(dspy.utils.callback.BaseCallback):  # type: ignore[misc]
    def __init__(self) -> None:
        self.calls = 0

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        self.calls += 1


def test_dspy_context_around_compile_reaches_every_call() -> None:
    def scenario(impl: str) -> dict[str, Any]:
        counter = _LMCallCounter()
        with dspy.context(adapter=dspy.JSONAdapter(), callbacks=[counter]):
            compile_small(optimizer(impl))
        task, prompt = CALLS[f"task-{impl}"], CALLS[f"prompt-{impl}"]
        return {
            "adapters": set(task) | set(prompt),
            "calls": len(task) + len(prompt),
            "callback_calls": counter.calls,
        }

    runs = both(scenario)
    for impl, run in runs.items():
        assert run["adapters"] == {"JSONAdapter"}, impl
        assert run["calls"] > 0 and run["callback_calls"] == run["calls"], impl


def test_examples_reach_the_metric_as_the_callers_objects() -> None:
    def scenario(impl: str) -> dict[str, Any]:
        trainset, valset = examples("train", 10, gold=True), examples("dev", 10, gold=True)
        seen: list[Any] = []

        def gold_metric(example: Any, prediction: Any, trace: Any = None) -> float:
            seen.append(example)
            return float(example.gold.matches(prediction.answer))

        program = optimizer(impl, metric=gold_metric).compile(
            build(), trainset=trainset, valset=valset, num_trials=2, minibatch=False
        )
        mine = {id(e) for e in trainset + valset}
        return {"score": program.score, "all_mine": all(id(e) in mine for e in seen), "n": len(seen)}

    runs = both(scenario)
    for impl, run in runs.items():
        assert run["n"] > 0 and run["all_mine"], impl
        assert run["score"] > 0, impl


def test_inside_better_together() -> None:
    def scenario(impl: str) -> Any:
        return dspy.BetterTogether(metric=exact_match, p=optimizer(impl))

    runs = both(scenario)
    for impl, composite in runs.items():
        assert isinstance(composite, dspy.BetterTogether), impl


def test_is_a_dspy_teleprompter_with_get_params() -> None:
    for impl in IMPLS:
        opt = optimizer(impl, seed=5)
        assert isinstance(opt, dspy.teleprompt.Teleprompter)
        params = opt.get_params()
        assert params["seed"] == 5 and params["metric"] is exact_match and params["auto"] is None


@pytest.mark.parametrize("minibatch", [False, True], ids=["full", "minibatch"])
def test_trial_logs_carry_dspys_keys(minibatch: bool) -> None:
    settings = {"minibatch": minibatch, "num_trials": 3}
    if minibatch:
        settings.update(minibatch_size=5, minibatch_full_eval_steps=2)
    runs = both(lambda impl: compile_small(optimizer(impl), **settings).trial_logs)

    def shapes(logs: dict[int, dict[str, Any]]) -> dict[str, set[str]]:
        by_kind: dict[str, set[str]] = {}
        for n, entry in logs.items():
            kind = "baseline" if n == 1 else "mb" if "mb_score" in entry else "full"
            by_kind.setdefault(kind, set()).update(k for k in entry if not k[0].isdigit() or n > 1)
        return by_kind

    want, got = shapes(runs["dspy"]), shapes(runs["dmipro"])
    assert set(got) == set(want)
    for kind, keys in want.items():
        assert keys <= got[kind], (kind, keys - got[kind])
    first_d, first_m = runs["dspy"][1], runs["dmipro"][1]
    assert first_m["total_eval_calls_so_far"] == first_d["total_eval_calls_so_far"] == 10
    assert isinstance(first_m["full_eval_program"], dspy.Module)
    assert first_m["full_eval_score"] == first_d["full_eval_score"]  # the same baseline program and data
    last = max(runs["dmipro"])
    assert runs["dmipro"][last]["total_eval_calls_so_far"] > 10


def test_one_compile_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import dspy.teleprompt.bootstrap as bootstrap_module

    monkeypatch.delenv("DMIPRO_HOME")
    reload_settings()
    before_globals = dict(vars(bootstrap_module))
    for impl in IMPLS:
        cwd = tmp_path / impl
        cwd.mkdir()
        monkeypatch.chdir(cwd)
        compile_small(optimizer(impl))
        assert os.listdir(cwd) == [], impl
    assert vars(bootstrap_module).get("tqdm") is before_globals["tqdm"]
    assert "print" not in vars(bootstrap_module)
    capsys.readouterr()
    # A plain BootstrapFewShot afterwards still reports as DSPy wrote it.
    with dspy.context(lm=recording_lm("plain")):
        dspy.BootstrapFewShot(metric=exact_match, max_bootstrapped_demos=1).compile(
            build(), trainset=examples("train", 3)
        )
    assert "Bootstrapped" in capsys.readouterr().out


def test_requires_permission_to_run_true_is_refused_as_dspy_does() -> None:
    for impl in IMPLS:
        with pytest.raises(ValueError, match="requires_permission_to_run"):
            compile_small(optimizer(impl), requires_permission_to_run=True)


def test_requires_permission_to_run_false_warns_and_runs(caplog: pytest.LogCaptureFixture) -> None:
    for impl in IMPLS:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            program = compile_small(optimizer(impl), requires_permission_to_run=False)
        assert any("deprecated" in r.getMessage() for r in caplog.records), impl
        assert program.score > 0, impl


def test_track_stats_false_attaches_no_stats() -> None:
    runs = both(lambda impl: compile_small(optimizer(impl, track_stats=False)))
    for impl, program in runs.items():
        for attr in ("trial_logs", "score", "candidate_programs"):
            assert not hasattr(program, attr), (impl, attr)
        assert isinstance(program, dspy.Module)


def test_log_dir_receives_the_same_candidate_files(tmp_path: Path) -> None:
    def scenario(impl: str) -> tuple[list[str], dict[int, Any]]:
        log_dir = tmp_path / impl
        program = compile_small(optimizer(impl, log_dir=str(log_dir)))
        files = sorted(p.name for p in (log_dir / "evaluated_programs").iterdir())
        return files, {n: e.get("full_eval_program_path") for n, e in program.trial_logs.items()}

    runs = both(scenario)
    assert runs["dmipro"][0] == runs["dspy"][0] == ["program_-1.json", "program_2.json", "program_3.json"]
    for path in runs["dmipro"][1].values():  # each path is a file plain dspy loads
        fresh = build()
        fresh.load(path)
        assert fresh.predict.signature.instructions


def test_verbose_logs_the_candidates(caplog: pytest.LogCaptureFixture) -> None:
    loggers = {"dspy": "dspy.teleprompt.mipro_optimizer_v2", "dmipro": "dmipro.teleprompt.mipro"}
    for impl in IMPLS:
        caplog.clear()
        with caplog.at_level(logging.INFO):
            compile_small(optimizer(impl, verbose=True))
        mine = [r for r in caplog.records if r.name == loggers[impl]]
        assert any("core" in r.getMessage().lower() for r in mine), impl


def _raises_on_first(example: Any, prediction: Any, trace: Any = None) -> float:
    if example.question.startswith(examples("dev", 1)[0].question[:30]):
        raise RuntimeError("metric exploded on one example")
    return exact_match(example, prediction, trace)


def test_provide_traceback_reports_the_traceback(caplog: pytest.LogCaptureFixture) -> None:
    for impl in IMPLS:
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            compile_small(optimizer(impl, metric=_raises_on_first), provide_traceback=True)
        tracebacks = [
            r for r in caplog.records if r.exc_info or "Traceback (most recent call last)" in r.getMessage()
        ]
        assert any("metric exploded" in (r.getMessage() + str(r.exc_info)) for r in tracebacks), impl


def test_bad_arguments_raise_value_errors_for_both() -> None:
    for impl in IMPLS:
        with pytest.raises(ValueError):
            optimizer(impl, auto="extreme")
        with pytest.raises(ValueError):
            compile_small(optimizer(impl, auto="light"))  # auto with num_candidates
        with pytest.raises(ValueError):
            optimizer(impl).compile(build(), trainset=[])
        with pytest.raises(ValueError, match="[Mm]inibatch.?size"):
            compile_small(optimizer(impl), minibatch=True, minibatch_size=35)


# -- save with dmipro, load with plain dspy ----------------------------------------------------


def test_two_predictor_program_saved_loads_in_plain_dspy(tmp_path: Path) -> None:
    from examples.multistage.program import build as build_two

    opt = optimizer("dmipro")
    optimized = opt.compile(
        build_two(), trainset=examples("train", 10), valset=examples("dev", 10), num_trials=2, minibatch=False
    )
    path = tmp_path / "two.json"
    optimized.save(str(path))
    fresh = build_two()
    fresh.load(str(path))
    assert [n for n, _ in fresh.named_predictors()] == ["plan", "solve.predict"]
    for (_, a), (_, b) in zip(fresh.named_predictors(), optimized.named_predictors(), strict=True):
        assert a.signature.instructions == b.signature.instructions
        assert [d.toDict() for d in a.demos] == [d.toDict() for d in b.demos]
    lm = recording_lm("reload")
    question = examples("dev", 12)[11].question
    with dspy.context(lm=lm):
        assert fresh(question=question).answer == optimized(question=question).answer
