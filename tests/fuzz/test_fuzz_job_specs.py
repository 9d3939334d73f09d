"""Fuzzed job specs: every one loads as a valid job or gets a clear DmiproError, and a refused
submit writes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from dmipro.config import reload_settings
from dmipro.errors import DmiproError
from dmipro.jobs import load_job
from dmipro.jobs.spec import JobSpec
from tests.conftest import free_port
from tests.fixtures.jobs import math_job, records
from tests.fuzz.strategies import FUZZ, JSON, mutated

SETTINGS = FUZZ.__class__(
    FUZZ, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)

BASE: dict[str, Any] = math_job(
    4,
    trainset=records("train", 4),
    prompt_lm={"model": "sim/math", "temperature": 1.0, "sim": {"latency_ms": 0}},
    optimizer={"auto": None, "num_candidates": 2, "num_trials": 2, "minibatch_size": 2, "seed": 3},
    executor={"backend": "thread", "concurrency": 2},
    register={"name": "fuzzed", "deploy": False},
)


def clear(exc: DmiproError) -> None:
    """A clear error: a non-empty, one-paragraph message (what the CLI prints after ``error:``)."""
    message = str(exc)
    assert message.strip(), f"{type(exc).__name__} without a message"
    assert "Traceback" not in message


def load_or_refuse(source: Any) -> None:
    try:
        job = load_job(source)
    except DmiproError as exc:
        clear(exc)
        return
    # A job that loads is whole: it survives the trip through JSON a worker makes.
    again = JobSpec.model_validate(job.to_json())
    assert again == job.spec


@SETTINGS
@given(spec=mutated(BASE))
def test_a_mutated_job_dict_loads_or_gets_a_clear_error(spec: Any) -> None:
    if not isinstance(spec, dict):
        spec = {"spec": spec}
    load_or_refuse(spec)


@SETTINGS
@given(spec=mutated(BASE) | JSON)
def test_a_mutated_job_file_loads_or_gets_a_clear_error(tmp_path: Path, spec: Any) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True), encoding="utf-8")
    load_or_refuse(path)


@SETTINGS
@given(text=st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_any_text_as_a_job_file_gets_a_clear_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    with pytest.raises(DmiproError) as info:
        load_job(path)
    clear(info.value)


@pytest.fixture
def unreachable_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    """Submits get as far as they can: SQLite allowed for workers, a broker that is not there."""
    monkeypatch.setenv("DMIPRO_ALLOW_SQLITE_REMOTE", "1")
    monkeypatch.setenv("DMIPRO_BROKER_URL", f"redis://127.0.0.1:{free_port()}/0")
    reload_settings()


@SETTINGS
@given(spec=mutated(BASE))
def test_a_refused_submit_writes_no_job(unreachable_broker: None, spec: Any) -> None:
    from dmipro.jobs.store import JobStore, jobs_table
    from dmipro.jobs.submit import submit

    if not isinstance(spec, dict):
        spec = {"spec": spec}
    with pytest.raises(DmiproError) as info:  # invalid, or valid with no broker to take it
        submit(spec, executor="rq")
    clear(info.value)
    with JobStore().engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(jobs_table)).scalar_one() == 0
