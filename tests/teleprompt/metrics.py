"""Metrics for tests, importable by reference."""

from __future__ import annotations

from typing import Any


def always_raises(example: Any, prediction: Any, trace: Any = None) -> float:
    raise RuntimeError("metric exploded")
