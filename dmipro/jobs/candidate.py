"""Candidates: an instruction and a demo list per predictor, as plain JSON.

A candidate is ``{predictor_name: {"instruction": str, "demos": [dict, ...]}}``. It
travels to workers instead of a program object, and its fingerprint (a hash of the
instruction texts and demos) keys the evaluation cache.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

__all__ = ["Candidate", "apply_candidate", "candidate_of", "demo_dict", "fingerprint"]

Candidate = dict[str, dict[str, Any]]


def fingerprint(candidate: Candidate | None) -> str:
    """A stable 32-hex-digit hash of a candidate (None: the program as written)."""
    text = json.dumps(candidate, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if hasattr(value, "model_dump"):
        return _jsonable(value.model_dump(mode="json"))
    return str(value)


def demo_dict(demo: Any) -> dict[str, Any]:
    """A demo (``dspy.Example`` or dict) as plain JSON data."""
    data = demo.toDict() if hasattr(demo, "toDict") else dict(demo)
    return {str(k): _jsonable(v) for k, v in data.items() if not str(k).startswith("dspy_")}


def candidate_of(program: Any) -> Candidate:
    """The instructions and demos ``program``'s predictors hold now."""
    return {
        name: {"instruction": pred.signature.instructions, "demos": [demo_dict(d) for d in pred.demos]}
        for name, pred in program.named_predictors()
    }


def apply_candidate(program: Any, candidate: Candidate | None) -> Any:
    """Set each named predictor's instruction and demos from ``candidate`` (in place); returns program."""
    import dspy

    if not candidate:
        return program
    predictors = dict(program.named_predictors())
    unknown = set(candidate) - set(predictors)
    if unknown:
        raise KeyError(f"candidate names predictors the program does not have: {sorted(unknown)}")
    for name, part in candidate.items():
        pred = predictors[name]
        if "instruction" in part:
            pred.signature = pred.signature.with_instructions(part["instruction"])
        if "demos" in part:
            pred.demos = [dspy.Example(**d) for d in part["demos"]]
    return program
