"""MIPROv2's run-mode arithmetic, with DSPy's constants (reference: ``dspy.MIPROv2``).

Everything here is pure: the number of candidates, trials and validation examples
follow from the settings, the program's predictor count and the data sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from dmipro.errors import OptimizationError
from dmipro.seeding import rng_for

__all__ = [
    "AUTO_RUN_SETTINGS",
    "BOOTSTRAPPED_FEWSHOT_EXAMPLES_IN_CONTEXT",
    "LABELED_FEWSHOT_EXAMPLES_IN_CONTEXT",
    "MIN_MINIBATCH_SIZE",
    "DemoSetPlan",
    "RunPlan",
    "default_split",
    "num_trials_for",
    "plan_demo_sets",
    "plan_run",
    "rng_for",
]

BOOTSTRAPPED_FEWSHOT_EXAMPLES_IN_CONTEXT = 3
LABELED_FEWSHOT_EXAMPLES_IN_CONTEXT = 0
MIN_MINIBATCH_SIZE = 50
AUTO_RUN_SETTINGS = {
    "light": {"n": 6, "val_size": 100},
    "medium": {"n": 12, "val_size": 300},
    "heavy": {"n": 18, "val_size": 1000},
}


def num_trials_for(num_predictors: int, zeroshot: bool, num_candidates: int) -> int:
    """DSPy's ``_set_num_trials_from_num_candidates``: max(2·V·log2(N), 1.5·N)."""
    variables = num_predictors if zeroshot else 2 * num_predictors
    return int(max(2 * variables * math.log2(num_candidates), 1.5 * num_candidates))


def default_split(n: int) -> tuple[int, int]:
    """DSPy's split of a trainset when no valset is given: (train size, val size)."""
    if n < 2:
        raise OptimizationError(
            f"the trainset has {n} example; at least 2 are needed when no valset is given"
        )
    val = min(1000, max(1, int(n * 0.80)))
    return n - val, val


@dataclass(frozen=True)
class RunPlan:
    """The resolved size of a MIPROv2 run."""

    zeroshot: bool
    num_fewshot_candidates: int
    num_instruct_candidates: int
    num_trials: int
    val_ids: tuple[int, ...]
    minibatch: bool
    minibatch_size: int
    full_eval_steps: int
    bootstrap_max_bootstrapped: int
    bootstrap_max_labeled: int

    @property
    def expected_full_evals(self) -> int:
        return math.ceil(self.num_trials / self.full_eval_steps) if self.minibatch else 0


def plan_run(
    *,
    auto: Literal["light", "medium", "heavy"] | None,
    num_candidates: int | None,
    num_trials: int | None,
    num_predictors: int,
    val_size: int,
    max_bootstrapped_demos: int,
    max_labeled_demos: int,
    minibatch: bool,
    minibatch_size: int,
    minibatch_full_eval_steps: int,
    seed: int,
) -> RunPlan:
    """DSPy's ``_set_hyperparams_from_run_mode`` and checks, for a program and data size."""
    zeroshot = max_bootstrapped_demos == 0 and max_labeled_demos == 0
    if auto is None:
        if num_candidates is None or num_trials is None:
            raise OptimizationError("with auto=None, give both num_candidates and num_trials")
        val_ids = tuple(range(val_size))
        n_fewshot = n_instruct = num_candidates
        trials = num_trials
    else:
        if num_candidates is not None or num_trials is not None:
            raise OptimizationError(
                f"auto={auto!r} sets num_candidates and num_trials itself; pass auto=None to set them"
            )
        if auto not in AUTO_RUN_SETTINGS:
            raise OptimizationError(f"auto must be light, medium or heavy, not {auto!r}")
        n = AUTO_RUN_SETTINGS[auto]["n"]
        keep = min(AUTO_RUN_SETTINGS[auto]["val_size"], val_size)
        val_ids = tuple(rng_for(seed, "valset").sample(range(val_size), keep))
        minibatch = len(val_ids) > MIN_MINIBATCH_SIZE
        n_fewshot = n
        n_instruct = n if zeroshot else int(0.5 * n)
        trials = num_trials_for(num_predictors, zeroshot, n)
    if minibatch and minibatch_size > len(val_ids):
        raise OptimizationError(
            f"minibatch_size ({minibatch_size}) is larger than the valset ({len(val_ids)}); "
            "lower minibatch_size or give more validation examples"
        )
    return RunPlan(
        zeroshot=zeroshot,
        num_fewshot_candidates=n_fewshot,
        num_instruct_candidates=n_instruct,
        num_trials=trials,
        val_ids=val_ids,
        minibatch=minibatch,
        minibatch_size=minibatch_size,
        full_eval_steps=minibatch_full_eval_steps,
        bootstrap_max_bootstrapped=BOOTSTRAPPED_FEWSHOT_EXAMPLES_IN_CONTEXT
        if zeroshot
        else max_bootstrapped_demos,
        bootstrap_max_labeled=LABELED_FEWSHOT_EXAMPLES_IN_CONTEXT if zeroshot else max_labeled_demos,
    )


@dataclass(frozen=True)
class DemoSetPlan:
    """One candidate demo set: its index, kind, the seed of its shuffle and its bootstrap size."""

    index: int
    kind: Literal["zeroshot", "labeled", "bootstrap", "shuffled"]
    shuffle_seed: int | None
    max_bootstrapped: int
    max_labeled: int


def plan_demo_sets(n: int, *, max_bootstrapped: int, max_labeled: int, seed: int) -> list[DemoSetPlan]:
    """The ``n`` demo sets DSPy's ``create_n_fewshot_demo_sets`` builds, in order.

    Set 0 is zero-shot, 1 labeled-only, 2 an unshuffled bootstrap, 3.. shuffled bootstraps
    of random size. As in DSPy, set 1 falls through to a shuffled bootstrap when
    ``max_labeled == 0``. Unlike DSPy, ``max_bootstrapped == 0`` gives shuffled sets of
    size 0 (labeled demos only) instead of crashing on ``randint(1, 0)``.
    """
    plans: list[DemoSetPlan] = []
    for index in range(n):
        if index == 0:
            plans.append(DemoSetPlan(0, "zeroshot", None, 0, 0))
        elif index == 1 and max_labeled > 0:
            plans.append(DemoSetPlan(1, "labeled", None, 0, max_labeled))
        elif index == 2:
            plans.append(DemoSetPlan(2, "bootstrap", None, max_bootstrapped, max_labeled))
        else:
            rng = rng_for(seed, "demo_set", index)
            shuffle_seed = rng.randrange(2**31)
            size = rng.randint(1, max_bootstrapped) if max_bootstrapped > 0 else 0
            plans.append(DemoSetPlan(index, "shuffled", shuffle_seed, size, max_labeled))
    return plans
