"""What changed between two saved programs: instructions and demos per predictor."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from dmipro.storage.record import state_predictors

__all__ = ["diff_programs"]


def diff_programs(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Compare two DSPy program states predictor by predictor.

    For each predictor name in either state: its instructions on both sides (with a
    unified diff when they differ) and its demos (counts, the demos only in ``a``, only in
    ``b``). ``changed`` is true when anything differs.
    """
    pa, pb = state_predictors(a), state_predictors(b)
    names = list(pa) + [n for n in pb if n not in pa]
    predictors: dict[str, Any] = {}
    for name in names:
        sa, sb = pa.get(name), pb.get(name)
        ia = sa["signature"]["instructions"] if sa else None
        ib = sb["signature"]["instructions"] if sb else None
        da = list(sa.get("demos", [])) if sa else []
        db = list(sb.get("demos", [])) if sb else []
        entry: dict[str, Any] = {
            "only_in": "a" if sb is None else "b" if sa is None else None,
            "instructions": {"a": ia, "b": ib, "changed": ia != ib},
            "demos": {
                "a": len(da),
                "b": len(db),
                "removed": [d for d in da if d not in db],
                "added": [d for d in db if d not in da],
                "changed": da != db,
            },
        }
        if ia != ib:
            entry["instructions"]["diff"] = list(
                difflib.unified_diff((ia or "").splitlines(), (ib or "").splitlines(), "a", "b", lineterm="")
            )
        entry["changed"] = bool(
            entry["only_in"] or entry["instructions"]["changed"] or entry["demos"]["changed"]
        )
        predictors[name] = entry
    return {"changed": any(p["changed"] for p in predictors.values()), "predictors": predictors}
