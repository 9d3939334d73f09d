"""The teleprompter base: DSPy's own ``Teleprompter``, so dmipro's optimizers fit where DSPy's do."""

from __future__ import annotations

from typing import Any

from dspy.teleprompt.teleprompt import Teleprompter as _DSPyTeleprompter

__all__ = ["Teleprompter"]


class Teleprompter(_DSPyTeleprompter):  # type: ignore[misc]
    """An optimizer of DSPy programs, with DSPy's ``compile`` signature and ``get_params()``.

    It is a ``dspy.teleprompt.Teleprompter``, so DSPy's composite optimizers
    (``dspy.BetterTogether(p=...)``) and compile callbacks accept it. Subclasses return an
    optimized ``dspy.Module``; the student is never modified.
    """

    def compile(
        self,
        student: Any,
        *,
        trainset: list[Any],
        teacher: Any = None,
        valset: list[Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        raise NotImplementedError
