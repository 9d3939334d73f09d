"""Finding 5: job ids cannot lead a write outside DMIPRO_HOME; a planted symlink is not written through."""

from __future__ import annotations

from pathlib import Path

import pytest

import dmipro
from dmipro.errors import JobSpecError
from dmipro.jobs import JobStore
from tests.fixtures.jobs import math_job

JOB = math_job(10, optimizer={"auto": None, "num_candidates": 2, "num_trials": 2, "seed": 9,
                                          "minibatch_size": 5},
               executor={"backend": "thread", "concurrency": 4})


@pytest.mark.parametrize("job_id", ["../../escaped", "<absolute>", ".hidden", "a/b", "x" * 65, ""])
def test_f05_a_job_id_that_names_a_path_is_refused_before_anything_is_written(
    job_id: str, dmipro_home: Path, tmp_path: Path
) -> None:
    def outside_home() -> set[Path]:
        return {p for p in tmp_path.rglob("*") if not p.is_relative_to(dmipro_home)}

    before = outside_home()
    if job_id == "<absolute>":
        job_id = str(tmp_path / "absolute-escaped")
    with pytest.raises(JobSpecError, match="invalid job id"):
        dmipro.optimize(JOB, job_id=job_id)
    with pytest.raises(JobSpecError, match="invalid job id"):
        dmipro.submit(JOB, executor="celery", job_id=job_id)
    with pytest.raises(JobSpecError, match="invalid job id"):
        JobStore().create(name="x", spec={}, executor="thread", job_id=job_id)
    assert outside_home() == before
    assert not list(dmipro_home.glob("programs/*"))


def test_f05_a_symlink_planted_at_the_program_path_is_replaced_not_written_through(
    dmipro_home: Path, tmp_path: Path
) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    programs = dmipro_home / "programs"
    programs.mkdir(parents=True)
    (programs / "planted.json").symlink_to(victim)
    result = dmipro.optimize(JOB, job_id="planted")
    assert victim.read_text() == "precious\n"
    saved = Path(result.program_path)
    assert saved == (programs / "planted.json").resolve() and not saved.is_symlink()
    assert '"metadata"' in saved.read_text()


def test_f05_a_programs_directory_that_leads_outside_home_is_refused(dmipro_home: Path,
                                                                     tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    dmipro_home.mkdir(parents=True)
    (dmipro_home / "programs").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(dmipro.DmiproError, match="outside"):
        dmipro.optimize(JOB, job_id="redirected")
    assert list(elsewhere.iterdir()) == []
