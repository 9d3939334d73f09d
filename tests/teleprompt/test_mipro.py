"""MIPROv2 end to end on the simulated LM: semantics, determinism, errors, results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dspy
import pytest

import dmipro
from dmipro.errors import DmiproError, JobSpecError, OptimizationError
from dmipro.events import bus
from dmipro.jobs import JobState, JobStore
from dmipro.lm._sim import sim_lm
from tests.fixtures.jobs import records
from tests.teleprompt.conftest import small_spec

REPO = Path(__file__).resolve().parents[2]


def _kinds(result: dmipro.OptimizationResult) -> list[tuple[int, str]]:
    return [(n, e["kind"]) for n, e in sorted(result.trial_logs.items())]


def test_parallel_trials_1_follows_dspys_sequence_of_decisions() -> None:
    result = dmipro.optimize(small_spec(num_trials=10, parallel_trials=1))
    kinds = _kinds(result)
    # DSPy: baseline is trial 1; minibatch trials 2-6, full eval 7, 8-12, full eval 13.
    expected = (
        [(1, "baseline")]
        + [(n, "minibatch") for n in range(2, 7)]
        + [(7, "full")]
        + [(n, "minibatch") for n in range(8, 13)]
        + [(13, "full")]
    )
    assert kinds == expected
    assert result.trials == 10
    # The winner is chosen by full-valset score only.
    full_scores = [e["score"] for e in result.trial_logs.values() if e["full_eval"]]
    assert result.best_score == max(full_scores)


def test_same_result_on_inline_and_thread_executors() -> None:
    spec = small_spec(num_trials=6)
    inline = dmipro.optimize(spec, executor="inline")
    thread = dmipro.optimize(spec, executor="thread", concurrency=16)
    assert inline.best_candidate == thread.best_candidate
    assert inline.best_score == thread.best_score
    assert {k: v["score"] for k, v in inline.trial_logs.items()} == {
        k: v["score"] for k, v in thread.trial_logs.items()
    }


def test_optimization_beats_the_baseline_and_saves_dspy_json(tmp_path: Path) -> None:
    out = tmp_path / "best.json"
    result = dmipro.optimize(small_spec(num_trials=8, val=60), out=out)
    assert result.best_score > result.baseline_score
    saved = json.loads(out.read_text())
    assert set(saved) == {"predict", "metadata"}
    assert saved["metadata"]["dependency_versions"]["dspy"] == dspy.__version__
    assert saved["predict"]["signature"]["instructions"] == result.best_candidate["predict"]["instruction"]


def test_saved_program_loads_with_plain_dspy_and_reproduces_the_score(tmp_path: Path) -> None:
    out = tmp_path / "best.json"
    spec = small_spec(num_trials=6, val=60)
    result = dmipro.optimize(spec, out=out)
    script = f"""
import json, dspy
from examples.math_qa.program import build, exact_match
from dmipro.lm._sim import sim_lm
program = build()
program.load({str(out)!r})
valset = [dspy.Example(**r).with_inputs("question") for r in json.loads({json.dumps(spec["valset"])!r})]
valset = [valset[i] for i in {result.val_ids!r}]
with dspy.context(lm=sim_lm("sim/math", temperature=0.0)):
    print(dspy.Evaluate(devset=valset, metric=exact_match, num_threads=4)(program).score)
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.strip().splitlines()[-1]) == pytest.approx(result.best_score)


def test_zero_shot_mode_optimizes_instructions_only() -> None:
    result = dmipro.optimize(small_spec(max_bootstrapped_demos=0, max_labeled_demos=0, num_trials=4))
    assert all("demos" not in part for part in result.best_candidate.values())
    assert all(not p.demos for _, p in result.program.named_predictors())
    assert all("0_predictor_demos" not in e["params"] for e in result.trial_logs.values())


def test_seed_zero_is_honoured() -> None:
    zero = dmipro.optimize(small_spec(seed=0, num_trials=4))
    record = JobStore().get(zero.job_id)
    assert record.spec["optimizer"]["seed"] == 0
    nine = dmipro.optimize(small_spec(seed=9, num_trials=4))
    assert zero.trial_logs != nine.trial_logs


def test_mipro_compile_is_a_drop_in_for_dspy() -> None:
    lm = sim_lm("sim/math", temperature=0.0)
    train = [dspy.Example(**r).with_inputs("question") for r in records("train", 30)]
    val = [dspy.Example(**r).with_inputs("question") for r in records("dev", 40)]
    from examples.math_qa.program import build, exact_match

    optimizer = dmipro.MIPROv2(
        metric=exact_match, task_model=lm, prompt_model=lm, auto=None, num_candidates=3, executor="thread"
    )
    program = optimizer.compile(build(), trainset=train, valset=val, num_trials=4, minibatch_size=10)
    assert isinstance(program, dspy.Module)
    assert program.score == max(c["score"] for c in program.candidate_programs)
    assert program.candidate_programs[0]["full_eval"] is True
    assert isinstance(program.candidate_programs[0]["program"], dspy.Module)
    assert program.stats["phases"]["propose"]["prompt_lm"]["calls"] > 0
    assert program.stats["phases"]["search"]["prompt_lm"]["calls"] == 0
    assert set(program.trial_logs) >= {1, 2}


def test_budget_stops_the_search_with_the_best_full_evaluated_program() -> None:
    result = dmipro.optimize(small_spec(num_trials=10, parallel_trials=1, max_lm_calls=140))
    assert result.stop_reason == "budget"
    assert result.trials < 10
    assert result.best_score == max(e["score"] for e in result.trial_logs.values() if e["full_eval"])
    assert JobStore().get(result.job_id).state is JobState.SUCCEEDED


def test_events_carry_job_and_trial_numbers() -> None:
    seen = []
    sub = bus.subscribe("dspy.optimization.*", seen.append)
    try:
        result = dmipro.optimize(small_spec(num_trials=4))
    finally:
        bus.remove(sub)
    names = [e.name for e in seen]
    assert names[0] == "dspy.optimization.start" and names[-1] == "dspy.optimization.complete"
    assert names.count("dspy.optimization.bootstrap_complete") == 1
    assert names.count("dspy.optimization.instruction_proposal_complete") == 1
    assert {e.job_id for e in seen} == {result.job_id}
    trials = [e.trial for e in seen if e.name == "dspy.optimization.trial_complete"]
    assert trials == sorted(set(trials)) and len(trials) == len(result.trial_logs)
    assert len({e.event_id for e in seen}) == len(seen)


def test_empty_trainset_is_a_clear_error() -> None:
    from examples.math_qa.program import build, exact_match

    lm = sim_lm("sim/math")
    with pytest.raises(OptimizationError, match="trainset is empty"):
        dmipro.MIPROv2(metric=exact_match, task_model=lm, prompt_model=lm).compile(build(), trainset=[])
    spec = small_spec()
    spec["trainset"] = []
    with pytest.raises(JobSpecError, match="trainset"):
        dmipro.optimize(spec)


def test_valset_of_fewer_than_two_is_a_clear_error_and_writes_nothing() -> None:
    with pytest.raises(OptimizationError, match="at least 2"):
        dmipro.optimize(small_spec(val=1, minibatch=False))
    assert JobStore().list() == []


def test_auto_with_num_trials_is_a_clear_error() -> None:
    spec = small_spec()
    spec["optimizer"] = {"auto": "light", "num_trials": 5}
    with pytest.raises(JobSpecError, match="auto sets num_candidates and num_trials"):
        dmipro.optimize(spec)
    from examples.math_qa.program import build, exact_match

    lm = sim_lm("sim/math")
    with pytest.raises(OptimizationError, match="auto='light' sets num_trials"):
        dmipro.MIPROv2(metric=exact_match, task_model=lm, prompt_model=lm).compile(
            build(),
            trainset=[dspy.Example(**r).with_inputs("question") for r in records("train", 10)],
            num_trials=5,
        )


def test_metric_that_always_raises_fails_clearly_and_registers_nothing() -> None:
    spec = small_spec(num_trials=4)
    spec["metric"] = "tests.teleprompt.metrics:always_raises"
    spec["register"] = {"name": "never", "deploy": True}
    with pytest.raises(DmiproError) as info:
        dmipro.optimize(spec)
    assert "metric exploded" in str(info.value)
    (record,) = JobStore().list()
    assert record.state is JobState.FAILED and "metric exploded" in (record.error or "")
    from dmipro.registry import list_names

    assert list_names() == []


def test_the_next_round_runs_alongside_the_last_and_decisions_do_not_depend_on_timing() -> None:
    # 8 slots and minibatches of 10: after TPE's 10 random start-up trials, each round asks
    # one trial. While a round runs, the next one is already asked and evaluated.
    lm = {"model": "sim/math", "temperature": 0.0,
          "sim": {"latency_ms": 4, "latency_dist": "lognormal", "latency_sigma": 1.0}}
    spec = small_spec(num_trials=18, lm=lm)
    spec["executor"] = {"backend": "thread", "concurrency": 8}
    events: list[tuple[str, int]] = []
    sub = bus.subscribe("dspy.optimization.trial_*", lambda e: events.append((e.name, e.trial)))
    try:
        first = dmipro.optimize(spec)
    finally:
        bus.remove(sub)
    flying: set[int] = set()
    most = 0
    for name, trial in events:
        if name.endswith("trial_start"):
            flying.add(trial)
            if trial > 12:  # past the baseline and the start-up trials
                most = max(most, len(flying))
        else:
            flying.discard(trial)
    assert most == 2, events

    # Each round is planned from the same state (the previous round running, earlier ones
    # told), so another run, with other thread timings, makes the same decisions.
    again = dmipro.optimize(spec)
    assert {k: (v["params"], v["score"]) for k, v in first.trial_logs.items()} == {
        k: (v["params"], v["score"]) for k, v in again.trial_logs.items()
    }
    assert (first.best_candidate, first.best_score) == (again.best_candidate, again.best_score)
    assert first.trials == again.trials == 18
