"""Hygiene: the declared dependencies are exactly the third-party packages dmipro imports."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Declared for the CLI (`celery ... flower`), or as the driver SQLAlchemy loads for postgresql+psycopg URLs.
USED_WITHOUT_IMPORT = {"flower", "psycopg"}


def _imported() -> set[str]:
    names: set[str] = set()
    for path in (REPO / "dmipro").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in {"dmipro", "__future__"}}


def _declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra, items in project["optional-dependencies"].items():
        if extra not in ("dev", "all"):
            reqs += items
    return {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}


def test_every_imported_package_is_declared_and_every_declared_one_is_used() -> None:
    dists = importlib.metadata.packages_distributions()
    declared = _declared()
    provided = {m: {d.lower().replace("_", "-") for d in dists.get(m, [m])} for m in _imported()}
    # A namespace package (opentelemetry) comes from several distributions: one declared is enough.
    undeclared = sorted(m for m, ds in provided.items() if not ds & declared)
    assert undeclared == [], "imported but not declared"
    used = set().union(*provided.values())
    assert sorted(declared - used - USED_WITHOUT_IMPORT) == [], "declared but never imported"
