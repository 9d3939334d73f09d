"""Plan-then-solve over the math_qa data: two predictors, one metric.

``plan`` writes the operations to perform; ``solve`` reasons with the question and the plan.
On the simulator a plan that matches the question helps the solver and a wrong plan hurts
it, so both predictors' prompts matter.
"""

from __future__ import annotations

import dspy

from examples.math_qa.program import exact_match

__all__ = ["PlanAndSolve", "build", "exact_match"]


class PlanAndSolve(dspy.Module):
    """Write a plan for the word problem, then answer it following the plan."""

    def __init__(self) -> None:
        super().__init__()
        self.plan = dspy.Predict("question -> plan")
        self.solve = dspy.ChainOfThought("question, plan -> answer")

    def forward(self, question: str) -> dspy.Prediction:
        """Plan, then solve; the prediction carries ``plan``, ``reasoning`` and ``answer``."""
        plan = self.plan(question=question).plan
        result = self.solve(question=question, plan=plan)
        return dspy.Prediction(plan=plan, reasoning=result.reasoning, answer=result.answer)


def build() -> dspy.Module:
    """A fresh, unoptimized :class:`PlanAndSolve`."""
    return PlanAndSolve()
