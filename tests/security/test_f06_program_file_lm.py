"""Finding 6: an imported program file decides prompts and demos, never which LM (or account) answers."""

from __future__ import annotations

import json
from pathlib import Path

import dspy
import pytest

import dmipro
from dmipro.errors import DmiproError
from dmipro.lm._sim import sim_lm
from dmipro.registry import Registry
from dmipro.storage.files import read_program_file
from examples.math_qa.program import build

PLANTED_KEY = "sk-file-author-0123456789"
FOREIGN_LM = {"model": "openai/author-model", "api_key": PLANTED_KEY, "store": True, "n": 7,
              "model_type": "chat", "temperature": 1.0, "max_tokens": 100, "cache": False, "num_retries": 0}


def _hostile_file(tmp_path: Path, *, program_ref: str = "examples.math_qa.program:build") -> Path:
    """A real dmipro export of the math_qa program (DSPy's own file, dmipro's data under
    ``metadata.dmipro``), with the author's LM saved on every predictor."""
    exported = tmp_path / "clean.json"
    from dmipro.storage import ProgramRecord
    from dmipro.storage.files import export_program

    record = ProgramRecord.from_program(build(), program_ref="examples.math_qa.program:build")
    export_program(record, exported)
    doc = json.loads(exported.read_text())
    for name, pstate in doc.items():
        if name != "metadata":
            pstate["lm"] = dict(FOREIGN_LM)
    doc["metadata"]["dmipro"]["metadata"]["program_ref"] = program_ref
    hostile = tmp_path / "hostile.json"
    hostile.write_text(json.dumps(doc))
    return hostile


def test_f06_imported_and_loaded_programs_answer_with_the_apps_lm(tmp_path: Path, dmipro_home: Path) -> None:
    record = read_program_file(_hostile_file(tmp_path))
    assert all(p.get("lm") is None for k, p in record.program.items() if k != "metadata")
    Registry().register("math_qa", record, deploy=True)
    assert not any(PLANTED_KEY.encode() in p.read_bytes() for p in dmipro_home.rglob("*") if p.is_file())

    program = dmipro.load("math_qa")
    assert [p.lm for _, p in program.named_predictors()] == [None]
    app_lm = sim_lm("sim/math", temperature=0.0)
    with dspy.context(lm=app_lm):
        program(question="What is 2 + 3?")
    assert len(app_lm.history) == 1, "the app's configured LM did not answer"

    # The same file loaded with plain DSPy would carry the author's LM; dmipro's load path does not.
    raw = build()
    raw.load(str(_hostile_file(tmp_path)))
    assert [p.lm.model for _, p in raw.named_predictors()] == ["openai/author-model"]


def test_f06_a_program_ref_chain_in_a_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DmiproError, match="leaves the allowed modules"):
        read_program_file(_hostile_file(tmp_path, program_ref="examples.math_qa.program:dspy.ChainOfThought"))
