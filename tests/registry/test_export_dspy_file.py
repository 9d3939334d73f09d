"""``dmipro export`` writes DSPy's own program file; plain ``program.load`` reads it back.

The commands run as the installed ``dmipro`` console script; loading and scoring use only
DSPy's own API (``program.load``, ``dspy.Evaluate``).
"""

from __future__ import annotations

import json
from pathlib import Path

import dspy

import dmipro.registry as registry
from dmipro.lm._sim import sim_lm
from dmipro.storage import ProgramRecord
from examples.math_qa.program import build, exact_match
from tests.fixtures.jobs import records
from tests.storage.programs import optimized, predictions
from tests.test_cli_foundation import dmipro_cli

REF = "examples.math_qa.program:build"


def _score(program: dspy.Module) -> float:
    devset = [dspy.Example(**r).with_inputs("question") for r in records("dev", 20)]
    with dspy.context(lm=sim_lm("sim/math")):
        result = dspy.Evaluate(devset=devset, metric=exact_match, num_threads=2, display_progress=False)(
            program
        )
    return float(result.score)


def test_export_loads_in_plain_dspy_with_the_same_predictions_and_score(
    tmp_path: Path, dmipro_home: Path
) -> None:
    original = optimized()
    history = [{"trial": 1, "score": 40.0}, {"trial": 2, "score": 80.0}]
    registry.register(
        "math_qa", ProgramRecord.from_program(original, program_ref=REF, best_score=80.0, history=history)
    )
    out = tmp_path / "math_qa.json"
    proc = dmipro_cli("export", "math_qa@1", "-o", str(out), home=dmipro_home)
    assert proc.returncode == 0, proc.stderr

    document = json.loads(out.read_text())
    assert set(document) == {"predict", "metadata"}  # what program.save() writes
    part = document["metadata"]["dmipro"]
    assert part["metadata"]["best_score"] == 80.0 and part["history"] == history

    fresh = build()
    fresh.load(str(out))  # DSPy's own loader, no dmipro code
    assert predictions(fresh) == predictions(original)
    assert _score(fresh) == _score(original)


def test_import_takes_an_export_an_earlier_export_and_a_dspy_file(tmp_path: Path, dmipro_home: Path) -> None:
    record = ProgramRecord.from_program(optimized(), program_ref=REF, best_score=80.0)
    registry.register("source", record)
    export = tmp_path / "export.json"
    assert dmipro_cli("export", "source@1", "-o", str(export), home=dmipro_home).returncode == 0
    earlier = tmp_path / "earlier.json"
    earlier.write_bytes(record.to_bytes())
    own = tmp_path / "dspy.json"
    optimized().save(str(own))

    for path, extra in ((export, ()), (earlier, ()), (own, ("--program", REF))):
        proc = dmipro_cli("import", str(path), "--name", "copy", *extra, home=dmipro_home)
        assert proc.returncode == 0, (path.name, proc.stderr)
    versions = registry.Registry().versions("copy")
    assert len(versions) == 3
    programs = [registry.load(f"copy@{v.version}") for v in versions]
    assert predictions(programs[0]) == predictions(programs[1]) == predictions(programs[2])
