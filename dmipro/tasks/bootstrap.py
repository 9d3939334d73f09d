"""``bootstrap_demo_set``: build one candidate demo set with DSPy's own few-shot optimizers."""

from __future__ import annotations

import logging
import random
from typing import Any

from dmipro.events import correlate
from dmipro.executor_adapters.task_table import task
from dmipro.jobs.candidate import demo_dict
from dmipro.jobs.runtime import get_runtime
from dmipro.lm.usage import metered
from dmipro.tasks._speculative import SpeculativeBootstrapFewShot

__all__ = ["bootstrap_demo_set"]

log = logging.getLogger(__name__)


def _quiet_bootstrap() -> Any:
    """``dspy.BootstrapFewShot`` without its terminal output, as a subclass (no global patched).

    Its ``_bootstrap`` draws a tqdm bar and prints a summary. Many compiles run at once on
    worker threads here: the bars deadlock on tqdm's shared write lock and the prints
    would land in ``--json`` output. This subclass runs the same loop (DSPy 3.4's, line
    for line) and sends the summary to the debug log; DSPy's module is left as it is, so
    a plain ``dspy.BootstrapFewShot`` elsewhere in the process still reports as usual.
    """
    global _QUIET
    if _QUIET is not None:
        return _QUIET
    from dspy.teleprompt import BootstrapFewShot

    class QuietBootstrapFewShot(BootstrapFewShot):  # type: ignore[misc]
        def _bootstrap(self, *, max_bootstraps: int | None = None) -> None:
            max_bootstraps = max_bootstraps or self.max_bootstrapped_demos
            bootstrap_attempts = 0
            bootstrapped: dict[int, bool] = {}
            self.name2traces: dict[str, list[Any]] = {name: [] for name in self.name2predictor}
            example_idx = 0
            for example_idx, example in enumerate(self.trainset):
                if len(bootstrapped) >= max_bootstraps:
                    break
                for round_idx in range(self.max_rounds):
                    bootstrap_attempts += 1
                    if self._bootstrap_one_example(example, round_idx):
                        bootstrapped[example_idx] = True
                        break
            log.debug(
                "bootstrapped %d full traces after %d examples for up to %d rounds, %d attempts",
                len(bootstrapped),
                example_idx,
                self.max_rounds,
                bootstrap_attempts,
            )
            self.validation = [x for idx, x in enumerate(self.trainset) if idx not in bootstrapped]
            random.Random(0).shuffle(self.validation)

    _QUIET = QuietBootstrapFewShot
    return _QUIET


_QUIET: Any = None


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
    from dspy.teleprompt import LabeledFewShot

    runtime = get_runtime(payload["job"])
    student = runtime.fresh_program()
    kind = payload["kind"]
    bootstrapper: Any = None
    with correlate(job_id=runtime.job_id), metered() as meter, runtime.context(lm=runtime.task_lm):
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
            bootstrapper = (_quiet_bootstrap() if sequential else SpeculativeBootstrapFewShot)(
                metric=runtime.metric,
                teacher_settings=runtime.teacher_settings,
                metric_threshold=payload.get("metric_threshold"),
                max_bootstrapped_demos=payload["max_bootstrapped"],
                max_labeled_demos=payload["max_labeled"],
                max_rounds=payload.get("max_rounds", 1),
                max_errors=payload.get("max_errors"),
            )
            program = bootstrapper.compile(student, teacher=teacher, trainset=trainset)
    if meter.faults.permanent is not None:
        # BootstrapFewShot counts a failed example and goes on; a rejected key is no
        # example's fault, and the job must stop on it.
        raise meter.faults.permanent
    demos = {name: [demo_dict(d) for d in pred.demos] for name, pred in program.named_predictors()}
    out = {
        "index": payload["index"],
        "demos": demos,
        "usage": meter.usage.to_json(),
        "faults": meter.faults.to_json(),
    }
    if isinstance(bootstrapper, SpeculativeBootstrapFewShot):
        out["depth"] = bootstrapper.depth  # its calls ran side by side: the chain is shorter
    return out
