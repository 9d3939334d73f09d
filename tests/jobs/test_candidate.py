"""Candidates: stable fingerprints, applying instructions and demos to a program, and reading them back."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import dspy
import pytest
from pydantic import BaseModel

from dmipro.jobs import apply_candidate, candidate_of, fingerprint
from dmipro.lm._sim import sim_lm
from examples.math_qa.program import build

DEMO = {
    "question": "Ava has 2 apples. She buys 3 more apples. How many apples does Ava have now?",
    "reasoning": "2 + 3 = 5.",
    "answer": "5",
}
OTHER_DEMO = {
    "question": "Noah has 9 pens. He gives away 4 of the pens. How many pens does Noah have now?",
    "reasoning": "9 - 4 = 5.",
    "answer": "5",
}
CANDIDATE = {
    "predict": {
        "instruction": "Think step by step and give the final answer as a single number.",
        "demos": [DEMO, OTHER_DEMO],
    }
}


def test_fingerprint_is_32_hex_digits_and_the_same_in_another_process() -> None:
    fp = fingerprint(CANDIDATE)
    assert len(fp) == 32 and int(fp, 16) >= 0
    code = (
        "import json, sys\n"
        "from dmipro.jobs.candidate import fingerprint\n"
        "print(fingerprint(json.loads(sys.stdin.read())))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(CANDIDATE),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={"PYTHONHASHSEED": "123"},
    )
    assert out.stdout.strip() == fp


def test_fingerprint_ignores_key_order() -> None:
    two = {
        "a": {"instruction": "A", "demos": [{"question": "q", "answer": "1"}]},
        "b": {"demos": [], "instruction": "B"},
    }
    reordered = {
        "b": {"instruction": "B", "demos": []},
        "a": {"demos": [{"answer": "1", "question": "q"}], "instruction": "A"},
    }
    assert fingerprint(two) == fingerprint(reordered)


@pytest.mark.parametrize(
    "changed",
    [
        {"predict": {**CANDIDATE["predict"], "instruction": "Think step by step."}},
        {"predict": {**CANDIDATE["predict"], "demos": [OTHER_DEMO, DEMO]}},
        {"predict": {**CANDIDATE["predict"], "demos": [DEMO]}},
        {"predict": {**CANDIDATE["predict"], "demos": [{**DEMO, "answer": "6"}]}},
        None,
    ],
    ids=["instruction", "demo-order", "fewer-demos", "demo-answer", "none"],
)
def test_anything_that_changes_the_prompt_changes_the_fingerprint(changed: Any) -> None:
    assert fingerprint(changed) != fingerprint(CANDIDATE)


def test_apply_candidate_sets_instruction_and_demos() -> None:
    program = apply_candidate(build(), CANDIDATE)
    pred = program.predict
    assert pred.signature.instructions == CANDIDATE["predict"]["instruction"]
    assert [dict(d) for d in pred.demos] == [DEMO, OTHER_DEMO]
    assert all(isinstance(d, dspy.Example) for d in pred.demos)
    # The fields of the signature are untouched.
    assert list(pred.signature.fields) == ["question", "reasoning", "answer"]


def test_the_applied_candidate_is_what_the_lm_sees() -> None:
    lm = sim_lm(temperature=0.0)
    program = apply_candidate(build(), CANDIDATE)
    with dspy.context(lm=lm):
        program(question="Mia has 4 cups. She buys 6 more cups. How many cups does Mia have now?")
    text = json.dumps(lm.history[-1]["messages"])
    assert CANDIDATE["predict"]["instruction"] in text
    assert "Ava has 2 apples" in text and "Noah has 9 pens" in text


def test_apply_candidate_leaves_other_programs_alone() -> None:
    original = build().predict.signature.instructions
    apply_candidate(build(), CANDIDATE)
    fresh = build()
    assert fresh.predict.signature.instructions == original and fresh.predict.demos == []


def test_a_partial_candidate_keeps_what_it_does_not_name() -> None:
    program = apply_candidate(build(), CANDIDATE)
    apply_candidate(program, {"predict": {"instruction": "Only the instruction."}})
    assert program.predict.signature.instructions == "Only the instruction."
    assert len(program.predict.demos) == 2
    apply_candidate(program, {"predict": {"demos": []}})
    assert program.predict.signature.instructions == "Only the instruction." and program.predict.demos == []


@pytest.mark.parametrize("empty", [None, {}])
def test_no_candidate_means_the_program_as_written(empty: Any) -> None:
    program = build()
    assert apply_candidate(program, empty) is program
    assert candidate_of(program) == candidate_of(build())


def test_unknown_predictor_names_are_refused() -> None:
    with pytest.raises(KeyError, match="generate"):
        apply_candidate(build(), {"generate": {"instruction": "x"}})


def test_candidate_of_round_trips() -> None:
    program = apply_candidate(build(), CANDIDATE)
    assert candidate_of(program) == CANDIDATE
    assert fingerprint(candidate_of(program)) == fingerprint(CANDIDATE)
    assert candidate_of(build()) == {
        "predict": {"instruction": "Answer the arithmetic word problem.", "demos": []}
    }


class Point(BaseModel):
    x: int
    y: int


def test_candidate_of_gives_plain_json_for_any_demo_values() -> None:
    program = build()
    program.predict.demos = [
        dspy.Example(
            question="q", answer=Point(x=1, y=2), steps=("a", "b"), dspy_uuid="internal", augmented=True
        )
    ]
    candidate = candidate_of(program)
    assert candidate["predict"]["demos"] == [
        {"question": "q", "answer": {"x": 1, "y": 2}, "steps": ["a", "b"], "augmented": True}
    ]
    json.dumps(candidate)
    again = candidate_of(apply_candidate(build(), candidate))
    assert again == candidate
