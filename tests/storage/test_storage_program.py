"""program_state is DSPy's own saved JSON; build_program rebuilds it and catches signature drift."""

from __future__ import annotations

import json
from pathlib import Path

import dspy
import pytest

from dmipro.errors import DecodeError, StorageError
from dmipro.storage import (
    ProgramRecord,
    build_program,
    lm_info,
    predictor_signatures,
    program_state,
    state_bytes,
)
from examples.math_qa.program import MathQA, build
from tests.storage.programs import SHARED, build_two_step, optimized, predictions

REF = "examples.math_qa.program:build"


@pytest.mark.parametrize("make", [optimized, build_two_step, lambda: dspy.Predict("question -> answer")])
def test_program_state_is_byte_for_byte_what_dspy_save_writes(make, tmp_path: Path) -> None:
    program = make()
    program.save(str(tmp_path / "dspy.json"))
    assert state_bytes(program_state(program)) == (tmp_path / "dspy.json").read_bytes()
    assert "dependency_versions" in program_state(program)["metadata"]


def test_record_captures_metadata_without_secrets() -> None:
    lm = dspy.LM("openai/gpt-x", api_key="sk-secret", temperature=0.3, max_tokens=250)
    record = ProgramRecord.from_program(
        optimized(),
        program_ref=build,
        job_id="job-1",
        optimizer={"auto": "light", "seed": 9},
        baseline_score=50.0,
        best_score=75.5,
        lm=lm,
        datasets={"trainset": "sha256:aa", "valset": "sha256:bb"},
        history=[{"trial": 1, "score": 70.0}, {"trial": 2, "score": 75.5}],
    )
    meta = record.metadata
    assert meta.program_ref == REF
    assert meta.lm == {"model": "openai/gpt-x", "model_type": "chat", "temperature": 0.3, "max_tokens": 250}
    assert "sk-secret" not in record.to_bytes().decode()
    assert meta.signatures["predict"].model_dump() == {
        "inputs": ["question"],
        "outputs": ["reasoning", "answer"],
    }
    assert meta.dspy_version == dspy.__version__ and meta.dmipro_version
    assert record.history[1] == {"trial": 2, "score": 75.5}
    assert ProgramRecord.from_bytes(record.to_bytes()) == record


def test_lm_info_drops_nested_credentials_and_keeps_token_limits() -> None:
    info = lm_info(
        {
            "model": "m",
            "max_tokens": 5,
            "api_key": "x",
            "extra_headers": {"Authorization": "y"},
            "opts": {"token": 1},
        }
    )
    assert info == {"model": "m", "max_tokens": 5, "opts": {}}


def test_build_program_gives_the_same_predictions_as_the_original() -> None:
    original = optimized()
    record = ProgramRecord.from_program(original, program_ref=REF)
    rebuilt = build_program(record)
    assert rebuilt.predict.signature.instructions == original.predict.signature.instructions
    assert predictions(rebuilt) == predictions(original)
    # The state matters: the unoptimized program answers differently.
    assert predictions(build()) != predictions(original)


def test_plain_dspy_loads_the_program_part_of_an_export(tmp_path: Path) -> None:
    original = optimized()
    document = json.loads(ProgramRecord.from_program(original, program_ref=REF).to_bytes())
    (tmp_path / "program.json").write_text(json.dumps(document["program"]))
    fresh = build()
    fresh.load(str(tmp_path / "program.json"))
    assert predictions(fresh) == predictions(original)


def test_an_instance_reference_is_copied_not_changed() -> None:
    record = ProgramRecord.from_program(optimized(), program_ref="tests.storage.programs:SHARED")
    rebuilt = build_program(record)
    assert rebuilt is not SHARED
    assert SHARED.predict.demos == [] and rebuilt.predict.demos


def test_renamed_signature_fields_are_reported_on_load() -> None:
    record = ProgramRecord.from_program(optimized(), program_ref=REF)
    with pytest.raises(StorageError, match=r"no longer match.*reasoning, answer.*reasoning, final_answer"):
        build_program(record, program_ref="tests.storage.programs:build_renamed")


def test_changed_predictors_are_reported_on_load() -> None:
    record = ProgramRecord.from_program(optimized(), program_ref=REF)
    with pytest.raises(
        StorageError, match=r"in the code but not saved: check, draft.*saved but not in the code: predict"
    ):
        build_program(record, program_ref="tests.storage.programs:build_two_step")


def test_a_reference_outside_the_allowlist_is_never_imported() -> None:
    record = ProgramRecord.from_program(optimized(), program_ref=REF)
    with pytest.raises(StorageError, match="DMIPRO_ALLOWED_MODULES"):
        build_program(record, program_ref="dmipro_evil_module:build")


def test_multi_predictor_and_bare_predict_programs_round_trip() -> None:
    two = build_two_step()
    two.check.signature = two.check.signature.with_instructions("Check the draft.")
    rebuilt = build_program(
        ProgramRecord.from_program(two, program_ref="tests.storage.programs:build_two_step")
    )
    assert rebuilt.check.signature.instructions == "Check the draft."
    assert set(predictor_signatures(rebuilt)) == {"draft.predict", "check"}

    bare = dspy.Predict(MathQA)
    bare.signature = bare.signature.with_instructions("Bare instruction.")
    record = ProgramRecord.from_program(bare, program_ref="tests.storage.programs:build_bare")
    assert "signature" in record.program  # flat, as DSPy saves a bare Predict
    assert build_program(record).signature.instructions == "Bare instruction."


def test_a_record_must_carry_dspy_json() -> None:
    good = ProgramRecord.from_program(optimized(), program_ref=REF).to_json()
    bad = dict(
        good, program={"predict": {"signature": "not an object"}, "metadata": good["program"]["metadata"]}
    )
    with pytest.raises(DecodeError, match="signature"):
        ProgramRecord.from_json(bad)
