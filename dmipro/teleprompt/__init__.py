"""MIPROv2 as a coordinator over executors: plan, bootstrap, propose, search."""

from __future__ import annotations

from dmipro.jobs.plan import (
    AUTO_RUN_SETTINGS,
    DemoSetPlan,
    RunPlan,
    num_trials_for,
    plan_demo_sets,
    plan_run,
)
from dmipro.jobs.runtime import plan_for
from dmipro.teleprompt.coordinator import Coordinator
from dmipro.teleprompt.mipro import MIPROv2, run_job
from dmipro.teleprompt.result import OptimizationResult, PhaseStats
from dmipro.teleprompt.search import SearchSpace, Study
from dmipro.teleprompt.teleprompt import Teleprompter

__all__ = [
    "AUTO_RUN_SETTINGS",
    "Coordinator",
    "DemoSetPlan",
    "MIPROv2",
    "OptimizationResult",
    "PhaseStats",
    "RunPlan",
    "SearchSpace",
    "Study",
    "Teleprompter",
    "num_trials_for",
    "plan_demo_sets",
    "plan_for",
    "plan_run",
    "run_job",
]
