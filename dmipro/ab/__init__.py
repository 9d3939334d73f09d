"""A/B testing and the production loop: experiments between registry versions.

    import dmipro

    exp = dmipro.ab.create("qa-exp", control="math_qa@1", treatment="math_qa@2", split=0.5)
    arm = exp.assign(user_id)                 # hashed, the same in every process; no database write
    answer = arm.program(question=q)          # a ready dspy.Module, cached per process
    exp.record(user_id, 1.0, latency_ms=120)  # buffered, written in batches
    exp.analyze()["decision"]                 # "treatment" | "control" | "continue" | "no_difference"
    exp.promote()                             # deploys the winner through the registry

    mon = dmipro.ab.monitor("math_qa")        # the deployed version, after the experiment
    mon.record(user_id, 0.0); mon.check()     # regression -> dspy.ab.regression, rollback if configured

    dmipro.ab.offline("math_qa@1", "math_qa@2", "job.yaml", split="test")  # paired test, no traffic
    dmipro.ab.plan(baseline=0.5, mde=0.05, power=0.8)                     # units needed

Statistics are anytime-valid by default (mixture SPRT, confidence sequences): see
:mod:`dmipro.ab.stats`.
"""

from __future__ import annotations

from dmipro.ab.experiment import DEFAULT_GUARDRAILS, Arm, Experiment, create, get
from dmipro.ab.experiment import list_experiments as list  # the public name shadows the builtin here only
from dmipro.ab.monitor import Monitor, monitor
from dmipro.ab.offline import compare as offline
from dmipro.ab.stats import plan

__all__ = [
    "DEFAULT_GUARDRAILS",
    "Arm",
    "Experiment",
    "Monitor",
    "create",
    "get",
    "list",
    "monitor",
    "offline",
    "plan",
]
