"""``bootstrap_demo_set``: build one candidate demo set with DSPy's own few-shot optimizers."""

from __future__ import annotations

import logging
import random
from types import SimpleNamespace
from typing import Any

from dmipro.events import correlate
from dmipro.jobs.candidate import demo_dict
from dmipro.jobs.runtime import get_runtime
from dmipro.lm.usage import metered
from dmipro.tasks._registry import task
from dmipro.tasks._speculative import SpeculativeBootstrapFewShot

__all__ = ["bootstrap_demo_set"]

log = logging.getLogger(__name__)


def _quiet_bootstrap_module() -> None:
    """Keep ``dspy.BootstrapFewShot`` off the terminal.

    It draws a tqdm bar and prints a summary per compile. Many compiles run at once on
    worker threads here: the bars deadlock on tqdm's shared write lock and the prints
    would land in ``--json`` output. Its module globals are pointed at a pass-through
    iterator and the debug log instead; the algorithm itself is untouched.
    """
    import dspy.teleprompt.bootstrap as module

    module.tqdm = SimpleNamespace(tqdm=lambda iterable, *args, **kwargs: iterable)
    module.print = lambda *args, **kwargs: log.debug(" ".join(str(a) for a in args))


@task("bootstrap_demo_set")
def bootstrap_demo_set(payload: dict[str, Any]) -> dict[str, Any]:
    """Payload: ``job``, ``index``, ``kind``, ``shuffle_seed``, ``max_bootstrapped``, ``max_labeled``,
    ``max_rounds``, ``metric_threshold``, ``max_errors``; optional ``speculative`` (default
    true: try several examples at once, same demos as DSPy's sequential loop).

    Returns ``{"index", "demos": {predictor: [demo, ...]}, "usage"}``. Semantics are
    ``dspy.BootstrapFewShot``'s (teacher with labeled demos, ``max_rounds``,
    ``metric_threshold``, ``max_errors``), run on the job's trainset, shuffled by
    ``shuffle_seed`` for the shuffled sets.
    """
    import dspy
    from dspy.teleprompt import BootstrapFewShot, LabeledFewShot

    _quiet_bootstrap_module()
    runtime = get_runtime(payload["job"])
    student = runtime.fresh_program()
    kind = payload["kind"]
    bootstrapper: Any = None
    with correlate(job_id=runtime.job_id), metered() as meter, dspy.context(lm=runtime.task_lm):
        if kind == "zeroshot":
            program = student.reset_copy()
        elif kind == "labeled":
            program = LabeledFewShot(k=payload["max_labeled"]).compile(
                student, trainset=runtime.split("train"), sample=True
            )
        else:
            trainset = list(runtime.split("train"))
            if payload.get("shuffle_seed") is not None:
                random.Random(payload["shuffle_seed"]).shuffle(trainset)
            teacher = runtime.teacher_program()
            # Speculative (several examples at once, same demos) unless the payload asks for
            # DSPy's one-at-a-time loop.
            sequential = payload.get("speculative") is False
            bootstrapper = (BootstrapFewShot if sequential else SpeculativeBootstrapFewShot)(
                metric=runtime.metric,
                metric_threshold=payload.get("metric_threshold"),
                max_bootstrapped_demos=payload["max_bootstrapped"],
                max_labeled_demos=payload["max_labeled"],
                max_rounds=payload.get("max_rounds", 1),
                max_errors=payload.get("max_errors"),
            )
            program = bootstrapper.compile(student, teacher=teacher, trainset=trainset)
    demos = {name: [demo_dict(d) for d in pred.demos] for name, pred in program.named_predictors()}
    out = {"index": payload["index"], "demos": demos, "usage": meter.usage.to_json()}
    if isinstance(bootstrapper, SpeculativeBootstrapFewShot):
        out["depth"] = bootstrapper.depth  # its calls ran side by side: the chain is shorter
    return out
