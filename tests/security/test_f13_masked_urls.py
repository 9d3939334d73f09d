"""Finding 13: a database or broker URL's password never appears in an error."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from dmipro.config import reload_settings
from dmipro.errors import DmiproError

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "Sup3r-S3cret-pw"


@pytest.mark.parametrize("url", [
    f"postgresql+psycopg://admin:{PASSWORD}@db.internal:notaport/dmipro",   # unparsable port
    f"postgresql+psycopg://admin:{PASSWORD}@x@db.internal/dmipro",          # an '@' in the password
    f"nosuchdriver://admin:{PASSWORD}@db.internal/dmipro",                  # no such dialect
])
def test_f13_an_unusable_database_url_is_reported_without_its_password(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DMIPRO_DATABASE_URL", url)
    reload_settings()
    from dmipro.jobs import JobStore

    with pytest.raises(DmiproError) as info:
        JobStore()
    assert PASSWORD not in str(info.value) and "admin" in str(info.value)
    env = {**os.environ, "DMIPRO_DATABASE_URL": url, "DMIPRO_HOME": str(tmp_path),
           "DMIPRO_CONFIG": str(tmp_path / "none.yaml")}
    run = subprocess.run([str(REPO / ".venv" / "bin" / "dmipro"), "status", "some-job"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.startswith("error: "), run.stderr
    assert PASSWORD not in run.stderr + run.stdout


def test_f13_an_unreachable_broker_is_reported_without_its_password(monkeypatch: pytest.MonkeyPatch) -> None:
    import dmipro
    from tests.conftest import free_port
    from tests.fixtures.jobs import math_job

    monkeypatch.setenv("DMIPRO_BROKER_URL", f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0")
    monkeypatch.setenv("DMIPRO_ALLOW_SQLITE_REMOTE", "1")
    reload_settings()
    with pytest.raises(DmiproError) as info:
        dmipro.submit(math_job(5, optimizer={"auto": None, "num_candidates": 2, "num_trials": 2,
                                             "minibatch_size": 5}), executor="rq")
    assert "cannot reach" in str(info.value) and PASSWORD not in str(info.value)
