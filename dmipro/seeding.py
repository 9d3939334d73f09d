"""Seeded random streams, one per purpose."""

from __future__ import annotations

import random

__all__ = ["rng_for"]


def rng_for(seed: int, *purpose: object) -> random.Random:
    """A generator for one purpose, seeded by the job seed and the purpose.

    Independent streams (not one shared sequence) keep every decision the same
    whatever order parallel tasks finish in.
    """
    return random.Random(":".join(str(p) for p in (seed, *purpose)))
