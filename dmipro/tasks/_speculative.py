"""Speculative bootstrap: DSPy's ``BootstrapFewShot`` with several examples tried at once.

``BootstrapFewShot._bootstrap`` walks the trainset in order, running the teacher on one
example after another until ``max_bootstrapped_demos`` of them pass the metric: a demo
set that needs 4 successes at a 70% success rate is about 6 sequential teacher runs.
Here the next few examples run at once on threads (each on its own copy of the teacher,
since DSPy takes the example out of the teacher's demos while it runs), and their
outcomes are then taken *in DSPy's order*: the same examples succeed, the same traces are
kept, errors are counted in the same order and ``max_errors`` raises at the same example.
At most as many examples run ahead as successes are still needed, so when every one of
them succeeds nothing is wasted; once enough have succeeded no further attempt starts,
and those already launched finish and are discarded. Their LM calls are counted, and
their number does not depend on timing: which attempts launch follows only from the
outcomes taken in order, so a job makes the same calls on any executor (a redelivered or
resumed task too). Only when an attempt raises past ``max_errors`` are the launched
attempts that have not started cancelled.

The result is identical to the sequential one because every attempt depends only on its
example, its round and the teacher, never on the attempts before it (the simulator and
a cached or temperature-0 LM answer the same prompt the same way).
"""

from __future__ import annotations

import contextvars
import logging
import random
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from dspy.teleprompt import BootstrapFewShot

from dmipro.lm.faults import FaultCounts
from dmipro.lm.usage import Usage, metered

__all__ = ["SpeculativeBootstrapFewShot"]

log = logging.getLogger(__name__)


@dataclass
class _Attempt:
    success: bool
    traces: dict[str, list[Any]]
    error: BaseException | None
    usage: Usage
    faults: FaultCounts


class SpeculativeBootstrapFewShot(BootstrapFewShot):  # type: ignore[misc]
    """``BootstrapFewShot`` whose bootstrap tries up to ``window`` examples at once; same result.

    ``window`` None: as many examples ahead as successes are still needed.
    """

    def __init__(self, *args: Any, window: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.window = window
        self.attempts = 0
        """Attempts whose outcome was used (what sequential DSPy would have run)."""
        self.speculative_attempts = 0
        """Attempts launched but not needed (their calls are counted in the usage)."""
        self.depth = 0
        """The critical path in LM calls: the longest chain of attempts that waited on each other."""

    # -- one attempt, on its own teacher copy ------------------------------------------------
    def _attempt(self, example: Any, round_idx: int) -> _Attempt:
        import dspy

        teacher = self.teacher.deepcopy()
        names = {id(p): name for name, p in teacher.named_predictors()}
        with metered() as meter:
            try:
                with dspy.context(trace=[], **self.teacher_settings):
                    lm = dspy.settings.lm
                    # DSPy: a fresh rollout at temperature 1.0 for every round after the first.
                    lm = lm.copy(rollout_id=round_idx, temperature=1.0) if round_idx > 0 else lm
                    with dspy.context(**({"lm": lm} if round_idx > 0 else {})):
                        for _, predictor in teacher.named_predictors():
                            predictor.demos = [x for x in predictor.demos if x != example]
                        prediction = teacher(**example.inputs())
                        trace = dspy.settings.trace
                    if self.metric:
                        value = self.metric(example, prediction, trace)
                        success = bool(value >= self.metric_threshold if self.metric_threshold else value)
                    else:
                        success = True
            except Exception as exc:
                return _Attempt(False, {}, exc, meter.usage, meter.faults)
        traces: dict[str, list[Any]] = {}
        if success:
            for predictor, inputs, outputs in trace:
                name = names.get(id(predictor))
                if name is not None:
                    traces.setdefault(name, []).append(dspy.Example(augmented=True, **inputs, **outputs))
        return _Attempt(success, traces, None, meter.usage, meter.faults)

    def _keep(self, attempt: _Attempt) -> None:
        """What DSPy's ``_bootstrap_one_example`` does with an outcome, in the trainset's order."""
        import dspy

        if attempt.error is not None:
            with self.error_lock:
                self.error_count += 1
                count = self.error_count
            limit = self.max_errors if self.max_errors is not None else dspy.settings.max_errors
            if count >= limit:
                raise attempt.error
            log.error("bootstrap: an example failed: %s", attempt.error)
            return
        for name, demos in attempt.traces.items():
            if len(demos) > 1:  # DSPy: one of several traces of the same predictor, 50/50
                from dspy.utils.hasher import Hasher

                rng = random.Random(Hasher.hash(tuple(demos)))
                demos = [rng.choice(demos[:-1]) if rng.random() < 0.5 else demos[-1]]
            self.name2traces[name].extend(demos)

    # -- DSPy's loop, with the next examples already running -----------------------------------
    def _bootstrap(self, *, max_bootstraps: int | None = None) -> None:
        import dspy

        max_bootstraps = max_bootstraps or self.max_bootstrapped_demos
        bootstrapped: dict[int, bool] = {}
        self.name2traces: dict[str, list[Any]] = {name: [] for name in self.name2predictor}
        parent = dspy.settings.usage_tracker
        futures: dict[tuple[int, int], Future[_Attempt]] = {}
        # An attempt launched after another one's outcome was taken is one step further down
        # the critical path; those launched at the start are the first step.
        generation: dict[tuple[int, int], int] = {}
        current = 0
        used: set[tuple[int, int]] = set()
        trainset = list(self.trainset)
        width = self.window

        def launch(pool: ThreadPoolExecutor, key: tuple[int, int]) -> None:
            if key not in futures:
                generation[key] = current + 1
                context = contextvars.copy_context()
                futures[key] = pool.submit(context.run, self._attempt, trainset[key[0]], key[1])

        pool = ThreadPoolExecutor(max_workers=max(1, width or max_bootstraps),
                                  thread_name_prefix="dmipro-bootstrap")
        failed = True
        try:
            for index in range(len(trainset)):
                if len(bootstrapped) >= max_bootstraps:
                    break
                need = max_bootstraps - len(bootstrapped)
                ahead = width or max(1, need)
                for j in range(index, min(len(trainset), index + ahead)):
                    launch(pool, (j, 0))  # later rounds only run when DSPy would run them
                for round_idx in range(self.max_rounds):
                    launch(pool, (index, round_idx))
                    attempt = futures[(index, round_idx)].result()
                    used.add((index, round_idx))
                    current = generation[(index, round_idx)]
                    self.depth = max(self.depth, current * max(1, attempt.usage.calls))
                    self.attempts += 1
                    self._keep(attempt)
                    if attempt.success:
                        bootstrapped[index] = True
                        break
            failed = False
        finally:
            if failed:  # past max_errors (or interrupted): start nothing more
                for future in futures.values():
                    future.cancel()
            pool.shutdown(wait=True)  # launched attempts finish, so every call is counted
            total, faults = Usage(), FaultCounts()
            for key, future in futures.items():
                if future.cancelled():
                    continue
                if key not in used:
                    self.speculative_attempts += 1
                exc = future.exception()
                if exc is None:
                    total.add(future.result().usage)
                    faults.add(future.result().faults)
            if parent is not None and hasattr(parent, "usage"):
                parent.usage.add(total)  # every attempt's calls, the discarded ones' too
            if parent is not None and hasattr(parent, "faults"):
                parent.faults.add(faults)  # their retries and LM errors, a rejected key's too

        self.validation = [x for i, x in enumerate(trainset) if i not in bootstrapped]
        random.Random(0).shuffle(self.validation)
