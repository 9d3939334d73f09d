"""Finding 12: a program's trial history is capped on import and never parsed when a program is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa

import dmipro
from dmipro.errors import DecodeError
from dmipro.registry import Registry
from dmipro.storage import ProgramRecord
from dmipro.storage.files import export_program, read_program_file
from examples.math_qa.program import build


def test_f12_a_huge_history_is_refused_and_loading_never_reads_the_history(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    export_program(ProgramRecord.from_program(build(), program_ref="examples.math_qa.program:build"), path)
    doc = json.loads(path.read_text())
    doc["metadata"]["dmipro"]["history"] = [{"trial": i, "score": 0.5} for i in range(400_000)]  # ~10 MB
    path.write_text(json.dumps(doc))
    with pytest.raises(DecodeError, match="history has 400000 entries; at most 10000"):
        read_program_file(path)

    # A registered program: loading it does not touch its history (here made unreadable in the database).
    record = ProgramRecord.from_program(build(), program_ref="examples.math_qa.program:build",
                                        history=[{"trial": 1, "score": 0.5}])
    info = Registry().register("math_qa", record, deploy=True)
    from dmipro.db import get_engine

    with get_engine().begin() as conn:
        conn.execute(sa.text("UPDATE dmipro_programs SET history = :h WHERE id = :id"),
                     {"h": json.dumps({"not": "a list"}), "id": info.program_id})
    program = dmipro.load("math_qa")
    assert [name for name, _ in program.named_predictors()]
    with pytest.raises(DecodeError):  # the history is read (and found corrupt) only when asked for
        Registry().get("math_qa")
