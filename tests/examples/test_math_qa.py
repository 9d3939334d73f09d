"""The math_qa demo: shipped data, the metric's tolerance, the programs and their job files."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import dspy
import pytest
import yaml

from dmipro.lm._math import solve
from dmipro.lm._sim import sim_lm
from examples.math_qa.generate import DATA_DIR, SPLITS, write_splits
from examples.math_qa.program import MathQA, build, exact_match

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _records(split: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (DATA_DIR / f"{split}.jsonl").read_text().splitlines()]


def test_shipped_splits_are_disjoint_mixed_and_correct() -> None:
    questions: set[str] = set()
    for split in SPLITS:
        records = _records(split)
        assert len(records) == 300
        assert {r["level"] for r in records} == {1, 2, 3}
        for record in records:
            assert set(record) == {"question", "answer", "level"}
            assert solve(record["question"]) == int(record["answer"])
        split_questions = {r["question"] for r in records}
        assert len(split_questions) == 300 and not split_questions & questions
        questions |= split_questions


def test_generator_reproduces_the_shipped_files(tmp_path: Path) -> None:
    paths = write_splits(tmp_path)
    for split in SPLITS:
        assert paths[split].read_bytes() == (DATA_DIR / f"{split}.jsonl").read_bytes()


@pytest.mark.parametrize(
    ("predicted", "expected", "score"),
    [
        ("42", "42", 1.0), ("42.", "42", 1.0), ("$42", "42", 1.0), ("42 apples", "42", 1.0),
        ("1,000", "1000", 1.0), ("The answer is 42", "42", 1.0), (" 42 \n", "42", 1.0), ("42.0", "42", 1.0),
        ("12 + 30 = 42", "42", 1.0), ("-5", "-5", 1.0),
        ("43", "42", 0.0), ("forty-two", "42", 0.0), ("", "42", 0.0), ("4,200", "42", 0.0),
        ("Paris", "paris", 1.0), ("Lyon", "Paris", 0.0),
    ],
)
def test_exact_match_tolerates_formatting(predicted: str, expected: str, score: float) -> None:
    example = dspy.Example(question="q", answer=expected).with_inputs("question")
    assert exact_match(example, dspy.Prediction(answer=predicted)) == score


def test_exact_match_without_an_answer_is_zero() -> None:
    example = dspy.Example(question="q", answer="1").with_inputs("question")
    assert exact_match(example, dspy.Prediction(reasoning="1")) == 0.0


def test_build_is_chain_of_thought_over_math_qa() -> None:
    program = build()
    assert isinstance(program, dspy.ChainOfThought)
    signature = program.predict.signature
    assert signature.instructions == "Answer the arithmetic word problem."
    assert list(signature.input_fields) == ["question"]
    assert list(signature.output_fields) == ["reasoning", "answer"]
    assert MathQA.__doc__ == "Answer the arithmetic word problem."


def _job(path: Path) -> dict[str, Any]:
    job = yaml.safe_load(path.read_text())
    for key in ("program", "metric"):
        module, _, attr = job[key].partition(":")
        assert callable(getattr(importlib.import_module(module), attr))
    for key in ("trainset", "valset"):
        module, sep, attr = job[key].partition(":")
        if sep:  # a loader reference
            assert getattr(importlib.import_module(module), attr)()
        else:
            assert (path.parent / job[key]).resolve().is_file()
    return dict(job)


def test_math_qa_job_file() -> None:
    job = _job(EXAMPLES / "math_qa" / "job.yaml")
    assert job["lm"] == {"model": "sim/math", "temperature": 0.0}
    assert job["prompt_lm"]["model"] == "sim/math" and job["input_keys"] == ["question"]


def test_multistage_job_file_and_program() -> None:
    job = _job(EXAMPLES / "multistage" / "job.yaml")
    # math_qa's data, through its loaders: dataset paths may not leave the job's directory.
    assert job["trainset"] == "examples.math_qa.program:train"
    assert job["valset"] == "examples.math_qa.program:dev"
    from examples.math_qa.program import dev, train

    assert train() == _records("train") and dev() == _records("dev")
    from examples.multistage.program import build as build_multistage
    from examples.multistage.program import exact_match as multistage_metric

    program = build_multistage()
    assert [name for name, _ in program.named_predictors()] == ["plan", "solve.predict"]
    assert multistage_metric is exact_match
    records = _records("dev")[:20]
    with dspy.context(lm=sim_lm(temperature=0.0)):
        scores = [exact_match(dspy.Example(**r), program(question=r["question"])) for r in records]
    assert 0 < sum(scores) < len(scores)


def test_saved_program_loads_with_plain_dspy(tmp_path: Path) -> None:
    program = build()
    program.predict.signature = program.predict.signature.with_instructions("Think step by step.")
    path = tmp_path / "program.json"
    program.save(str(path))
    loaded = build()
    loaded.load(str(path))
    assert loaded.predict.signature.instructions == "Think step by step."
