"""Hypothesis strategies for bad input: JSON values, odd strings, and mutations of good documents."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st

FUZZ = settings(max_examples=40, deadline=None, database=None, derandomize=True)
"""Small, fixed runs: the whole fuzz suite stays well under a minute, and a failure replays."""

ODD_STRINGS = st.sampled_from(
    [
        "",
        " ",
        "\x00",
        "é",
        "🙂",
        "-1",
        "1e309",
        "NaN",
        "null",
        "true",
        "[]",
        "{}",
        "a" * 300,
        "examples.math_qa.program:build",
        "examples.math_qa.program:exact_match",
        "examples.math_qa.program",
        "examples.math_qa.program:nope",
        "os:system",
        "builtins:eval",
        "subprocess:Popen",
        "tests.fixtures.broken:x",
        "tests.fixtures.metrics:NOT_CALLABLE",
        "examples:",
        ":build",
        "a:b:c",
        "../../etc/passwd",
        "/dev/zero",
        "sim/math",
        "openai/gpt-x",
        "question",
        "answer",
        "light",
        "heavy",
        "thread",
        "celery",
    ]
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | ODD_STRINGS
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8) | ODD_STRINGS, inner, max_size=4)
    ),
    max_leaves=10,
)
"""Any JSON-like value (and some YAML-only ones: non-finite floats, huge integers)."""


def paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside ``doc`` (dict keys and list indices), the root included."""
    out = [prefix]
    if isinstance(doc, dict):
        for key, value in doc.items():
            out += paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc[:3]):  # a few items of a long list are enough
            out += paths(value, (*prefix, i))
    return out


def _parent(doc: Any, path: tuple[Any, ...]) -> Any:
    for step in path[:-1]:
        doc = doc[step]
    return doc


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any], max_mutations: int = 3) -> Any:
    """``base`` with a few values replaced, removed or added: mostly almost-valid documents."""
    doc: Any = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, max_mutations))):
        candidates = paths(doc)
        path = draw(st.sampled_from(candidates))
        op = draw(st.sampled_from(["replace", "delete", "add"]))
        if not path:
            if op == "replace":
                doc = draw(JSON)
            continue
        parent = _parent(doc, path)
        if not isinstance(parent, dict | list):
            continue
        if op == "replace":
            parent[path[-1]] = draw(JSON)
        elif op == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8) | ODD_STRINGS)] = draw(JSON)
        else:
            parent.append(draw(JSON))
    return doc
