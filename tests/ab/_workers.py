"""Entry points the A/B tests run as separate OS processes: ``python -m tests.ab._workers ...``."""

from __future__ import annotations

import json
import sys


def assign(name: str, n: int) -> None:
    """Print the arm of units 0..n-1 as one JSON list."""
    import dmipro

    exp = dmipro.ab.get(name)
    sys.stdout.write(json.dumps([exp.assign(f"user-{i}").name for i in range(n)]) + "\n")


def record(name: str, start: int, count: int) -> None:
    """Record ``count`` outcomes and exit normally: the exit flush must store every one."""
    import dmipro

    exp = dmipro.ab.get(name)
    for i in range(start, start + count):
        exp.record(f"user-{i}", i % 2, latency_ms=float(i % 50), tokens=100, cost_usd=0.0001)


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "assign":
        assign(args[0], int(args[1]))
    elif command == "record":
        record(args[0], int(args[1]), int(args[2]))
    else:
        raise SystemExit(f"unknown command {command}")
