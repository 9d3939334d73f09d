"""Plan, solve, check over the math_qa data: three predictors, one metric.

``plan`` writes the operations, ``solve`` reasons to a draft answer following the plan and
``check`` reviews the draft and gives the final answer. Every predictor's prompt changes
the simulator's answers, so the search has three instructions and three demo sets to
choose. Used by ``bench/scaling.py`` as the heavy multi-predictor job.
"""

from __future__ import annotations

import dspy

from examples.math_qa.program import exact_match

__all__ = ["PlanSolveCheck", "build", "exact_match"]


class PlanSolveCheck(dspy.Module):
    """Plan the word problem, solve it following the plan, then check the draft answer."""

    def __init__(self) -> None:
        super().__init__()
        self.plan = dspy.Predict("question -> plan")
        self.solve = dspy.ChainOfThought("question, plan -> draft_answer")
        self.check = dspy.ChainOfThought("question, plan, draft_answer -> answer")

    def forward(self, question: str) -> dspy.Prediction:
        """Plan, solve, check; the prediction carries ``plan``, ``draft_answer`` and ``answer``."""
        plan = self.plan(question=question).plan
        draft = self.solve(question=question, plan=plan).draft_answer
        result = self.check(question=question, plan=plan, draft_answer=draft)
        return dspy.Prediction(
            plan=plan, draft_answer=draft, reasoning=result.reasoning, answer=result.answer
        )


def build() -> dspy.Module:
    """A fresh, unoptimized :class:`PlanSolveCheck`."""
    return PlanSolveCheck()
