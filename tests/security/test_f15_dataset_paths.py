"""Finding 15: dataset paths stay in the job's directory (absolute paths, ``..`` and symlinks included)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dmipro.config import reload_settings
from dmipro.errors import DatasetError
from dmipro.jobs import load_job
from tests.fixtures.jobs import math_job, records


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    """A job directory, and a secret data file outside it."""
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    secret = tmp_path / "private" / "secrets.jsonl"
    secret.parent.mkdir()
    secret.write_text("\n".join(json.dumps({**r, "note": "PRIVATE"}) for r in records("train", 20)))
    (job_dir / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records("train", 20)))
    (job_dir / "link.jsonl").symlink_to(secret)
    return job_dir, secret


def _job_file(job_dir: Path, trainset: str) -> Path:
    path = job_dir / "job.yaml"
    spec = math_job(5)
    spec["trainset"] = trainset
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_f15_a_dataset_path_out_of_the_job_directory_is_refused(layout: tuple[Path, Path], how: str) -> None:
    job_dir, secret = layout
    source = {"absolute": str(secret), "dotdot": "../private/secrets.jsonl", "symlink": "link.jsonl"}[how]
    with pytest.raises(DatasetError, match=r"trainset: .*outside the job's directory.*DMIPRO_DATA_ROOTS"):
        load_job(_job_file(job_dir, source))
    assert load_job(_job_file(job_dir, "train.jsonl")).spec.trainset[0]["question"]


def test_f15_the_operator_may_allow_a_data_root(layout: tuple[Path, Path],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    job_dir, secret = layout
    monkeypatch.setenv("DMIPRO_DATA_ROOTS", str(secret.parent))
    reload_settings()
    job = load_job(_job_file(job_dir, "link.jsonl"))
    assert job.spec.trainset[0]["note"] == "PRIVATE"
