"""Fixtures for the A/B suite: two registered versions (the database comes from ``database_url``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import dmipro.registry as registry
from dmipro.ab import _recorder
from dmipro.storage import ProgramRecord
from examples.math_qa.program import build

REPO = Path(__file__).resolve().parents[2]
REF = "examples.math_qa.program:build"


@pytest.fixture(autouse=True)
def _fresh_recorders() -> Iterator[None]:
    """Each test writes through recorders of its own, closed (everything written) at its end."""
    _recorder._recorders.clear()
    yield
    for rec in list(_recorder._recorders.values()):
        rec.close()
    _recorder._recorders.clear()


def register_two(name: str = "math_qa", *, deploy: int | None = 1) -> list[int]:
    """Register math_qa@1 (as written) and @2 (a changed instruction); deploy ``deploy``."""
    versions = []
    for i, instruction in enumerate([None, "Think step by step and give the final answer as a number."]):
        program = build()
        if instruction:
            program.predict.signature = program.predict.signature.with_instructions(instruction)
        record = ProgramRecord.from_program(program, program_ref=REF, best_score=50.0 + 10 * i)
        versions.append(registry.register(name, record, deploy=False).version)
    if deploy is not None:
        registry.deploy(name, deploy)
    return versions


def subprocess_env() -> dict[str, str]:
    """The test's environment, with the repository importable (worker processes run this code)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env
