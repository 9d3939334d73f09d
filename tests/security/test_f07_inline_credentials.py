"""Finding 7: credentials anywhere in an LM block (headers, secrets, URLs) are refused, never stored."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from dmipro.errors import JobSpecError
from dmipro.jobs import JobStore, load_job
from tests.fixtures.jobs import math_job

REPO = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-planted-value"

HOSTILE: dict[str, dict[str, Any]] = {
    "header": {"extra_headers": {"api-key": SECRET}},
    "aws": {"aws_secret_access_key": SECRET},
    "client-secret": {"client_secret": SECRET},
    "url-userinfo": {"api_base": f"https://user:{SECRET}@llm.example.com/v1"},
    "url-query": {"api_base": f"https://llm.example.com/v1?api-key={SECRET}"},
    "base-url-alias": {"base_url": "https://llm.example.com/v1"},
    "callbacks": {"callbacks": ["os:system"]},
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_f07_credentials_in_any_lm_field_are_refused_and_never_stored(case: str, dmipro_home: Path) -> None:
    spec = math_job(3, lm={"model": "openai/gpt-4o-mini", **HOSTILE[case]})
    with pytest.raises(JobSpecError) as info:
        load_job(spec)
    assert info.value.field is not None and info.value.field.startswith("lm")
    assert SECRET not in str(info.value)
    import dmipro

    with pytest.raises(JobSpecError):
        dmipro.optimize(spec)
    assert JobStore().list() == []
    assert not any(SECRET.encode() in p.read_bytes() for p in dmipro_home.rglob("*") if p.is_file())


def test_f07_the_cli_refuses_a_header_secret_in_one_line_without_echoing_it(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(math_job(3, lm={"model": "openai/gpt-4o-mini",
                                                  "extra_headers": {"api-key": SECRET}})))
    run = subprocess.run([str(REPO / ".venv" / "bin" / "dmipro"), "validate", str(job)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("\n") == 1 and "lm" in run.stderr and "extra_headers" in run.stderr
    assert SECRET not in run.stderr + run.stdout
