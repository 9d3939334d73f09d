"""The teleprompter base: one entry point, ``compile``."""

from __future__ import annotations

from typing import Any

__all__ = ["Teleprompter"]


class Teleprompter:
    """An optimizer of DSPy programs, with DSPy's ``compile`` signature.

    Subclasses return an optimized ``dspy.Module``; the student is never modified.
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
