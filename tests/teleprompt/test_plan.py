"""MIPROv2's run-mode arithmetic and demo-set plan pinned to DSPy's values."""

from __future__ import annotations

import pytest

from dmipro.errors import OptimizationError
from dmipro.teleprompt import num_trials_for, plan_demo_sets, plan_run

# (auto, zero-shot) -> trial counts for 1, 2, 3 predictors, as dspy.MIPROv2 computes them.
DSPY_TRIALS = {
    ("light", False): [10, 20, 31],
    ("light", True): [9, 10, 15],
    ("medium", False): [18, 28, 43],
    ("medium", True): [18, 18, 21],
    ("heavy", False): [27, 33, 50],
    ("heavy", True): [27, 27, 27],
}


def _plan(auto: str | None = "light", predictors: int = 1, zeroshot: bool = False, val: int = 300, **kw):
    demos = 0 if zeroshot else 4
    args = dict(
        auto=auto,
        num_candidates=None,
        num_trials=None,
        num_predictors=predictors,
        val_size=val,
        max_bootstrapped_demos=demos,
        max_labeled_demos=demos,
        minibatch=True,
        minibatch_size=35,
        minibatch_full_eval_steps=5,
        seed=9,
    )
    args.update(kw)
    return plan_run(**args)


@pytest.mark.parametrize(("auto", "zeroshot"), list(DSPY_TRIALS))
def test_trial_counts_match_dspy(auto: str, zeroshot: bool) -> None:
    for predictors, expected in zip((1, 2, 3), DSPY_TRIALS[(auto, zeroshot)], strict=True):
        assert _plan(auto, predictors, zeroshot).num_trials == expected


@pytest.mark.parametrize(
    ("auto", "n", "val_size"), [("light", 6, 100), ("medium", 12, 300), ("heavy", 18, 1000)]
)
def test_candidates_and_valset_sizes(auto: str, n: int, val_size: int) -> None:
    plan = _plan(auto, val=2000)
    assert plan.num_fewshot_candidates == n
    assert plan.num_instruct_candidates == n // 2
    assert len(plan.val_ids) == val_size and len(set(plan.val_ids)) == val_size
    zeroshot = _plan(auto, zeroshot=True, val=2000)
    assert zeroshot.num_instruct_candidates == n
    # In zero-shot mode demos still inform the proposer: 3 bootstrapped, 0 labeled, as DSPy.
    assert (zeroshot.bootstrap_max_bootstrapped, zeroshot.bootstrap_max_labeled) == (3, 0)


def test_minibatch_follows_valset_size_in_auto_mode() -> None:
    assert _plan(val=51).minibatch is True
    assert _plan(val=50, minibatch_size=10).minibatch is False
    assert _plan(val=30).expected_full_evals == 0


def test_full_eval_count_is_ceil_of_trials_over_steps() -> None:
    assert _plan(predictors=2).expected_full_evals == 4  # 20 trials, every 5
    assert _plan(predictors=3).expected_full_evals == 7  # 31 trials


def test_seed_zero_is_honoured() -> None:
    zero = _plan(seed=0)
    nine = _plan(seed=9)
    assert zero.val_ids != nine.val_ids
    assert _plan(seed=0).val_ids == zero.val_ids


def test_auto_with_explicit_counts_is_refused() -> None:
    with pytest.raises(OptimizationError, match="auto='light' sets num_candidates"):
        _plan(num_trials=5)
    with pytest.raises(OptimizationError, match="give both"):
        _plan(auto=None, num_candidates=3)


def test_minibatch_larger_than_valset_is_refused() -> None:
    with pytest.raises(OptimizationError, match="minibatch_size"):
        _plan(auto=None, num_candidates=3, num_trials=4, val=20)


def test_num_trials_formula() -> None:
    assert num_trials_for(1, False, 6) == 10
    assert num_trials_for(1, True, 6) == 9


def test_demo_sets_kinds_and_order() -> None:
    sets = plan_demo_sets(6, max_bootstrapped=4, max_labeled=4, seed=9)
    assert [s.kind for s in sets] == ["zeroshot", "labeled", "bootstrap", "shuffled", "shuffled", "shuffled"]
    assert all(1 <= s.max_bootstrapped <= 4 for s in sets[3:])
    assert len({s.shuffle_seed for s in sets[3:]}) == 3


def test_demo_sets_without_labeled_demos_fall_through_to_shuffled() -> None:
    sets = plan_demo_sets(4, max_bootstrapped=4, max_labeled=0, seed=9)
    assert [s.kind for s in sets] == ["zeroshot", "shuffled", "bootstrap", "shuffled"]


def test_zero_bootstrapped_with_labeled_demos_does_not_crash() -> None:
    sets = plan_demo_sets(6, max_bootstrapped=0, max_labeled=3, seed=9)
    assert [s.max_bootstrapped for s in sets[3:]] == [0, 0, 0]
    assert sets[1].kind == "labeled"


def test_small_candidate_counts() -> None:
    assert [s.kind for s in plan_demo_sets(1, max_bootstrapped=4, max_labeled=4, seed=1)] == ["zeroshot"]
    assert [s.kind for s in plan_demo_sets(2, max_bootstrapped=4, max_labeled=4, seed=1)] == [
        "zeroshot",
        "labeled",
    ]
