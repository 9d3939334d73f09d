"""``--json`` leaves exactly one JSON document on stdout, whatever libraries print.

A custom module whose predictor uses a class-based signature (``class MathQA(dspy.Signature)``)
makes DSPy's ``get_dspy_source_code`` print the signature's source while the proposer
describes the program.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.fixtures.jobs import math_job, records
from tests.test_cli_foundation import dmipro_cli


def _job(tmp_path: Path) -> Path:
    spec = math_job(
        n=12,
        program="tests.fixtures.programs:class_signature_program",
        trainset=records("train", 12),
        optimizer={"auto": None, "num_candidates": 4, "num_trials": 2, "minibatch": False, "seed": 1},
        executor={"backend": "thread", "concurrency": 4},
    )
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_optimize_json_stdout_is_one_document_with_a_class_based_signature(
    tmp_path: Path, dmipro_home: Path
) -> None:
    proc = dmipro_cli("optimize", str(_job(tmp_path)), "--json", home=dmipro_home)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # the whole of stdout, not its last line
    assert report["best_score"] >= report["baseline_score"]
    # What DSPy printed went to stderr, where a terminal still shows it.
    assert "class MathQA" in proc.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("validate", "{job}", "--json"),
        ("evaluate", "{job}", "--json"),
        ("jobs", "--json"),
        ("registry", "list", "--json"),
        ("sim", "describe", "--json"),
    ],
    ids=lambda a: " ".join(a[:2]),
)
def test_other_commands_print_one_document(args: tuple[str, ...], tmp_path: Path, dmipro_home: Path) -> None:
    job = str(_job(tmp_path))
    proc = dmipro_cli(*(a.format(job=job) for a in args), home=dmipro_home)
    assert proc.returncode == 0, proc.stderr
    json.loads(proc.stdout)
