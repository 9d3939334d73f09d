"""The ``dmipro`` command as a user runs it: help, validate, evaluate (in process and over HTTP), sim."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

import dmipro
from dmipro.cli import main
from dmipro.config import reload_settings
from dmipro.errors import ConfigError
from tests.fixtures.jobs import JOB_FILE, REPO, math_job, records

DMIPRO = REPO / ".venv" / "bin" / "dmipro"


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DMIPRO_")}
    env.update(
        DMIPRO_HOME=str(home),
        DMIPRO_ALLOWED_MODULES="examples,tests",
        DMIPRO_CONFIG=str(home.parent / "no-dmipro.yaml"),
        **extra,
    )
    return env


def dmipro_cli(*args: str, home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the installed ``dmipro`` console script from the repository root."""
    return subprocess.run(
        [str(DMIPRO), *args], cwd=REPO, env=_env(home, **env), capture_output=True, text=True, timeout=180
    )


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``dmipro.cli.main`` in this process; returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out, err = capsys.readouterr()
    code = info.value.code
    return (code if isinstance(code, int) else 0 if code is None else 1), out, err


def test_help_lists_the_commands(dmipro_home: Path) -> None:
    proc = dmipro_cli("--help", home=dmipro_home)
    assert proc.returncode == 0, proc.stderr
    for command in ("validate", "evaluate", "sim"):
        assert f" {command} " in proc.stdout


def test_sim_help_and_bare_commands_show_usage(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "sim", "--help")
    assert code == 0 and " serve " in out and " describe " in out
    code, out, err = run_main(capsys)
    assert "Usage" in out + err and "validate" in out + err


def test_validate_prints_ok(dmipro_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    proc = dmipro_cli("validate", "examples/math_qa/job.yaml", home=dmipro_home)
    assert (proc.returncode, proc.stdout) == (0, "ok\n"), proc.stderr
    code, out, _ = run_main(capsys, "validate", str(JOB_FILE), "--json")
    assert code == 0
    data = json.loads(out)
    assert (
        data["ok"] is True and data["name"] == "math_qa" and (data["trainset"], data["valset"]) == (300, 300)
    )
    assert not dmipro_home.exists() or not any(dmipro_home.rglob("*"))


@pytest.mark.slow
def test_evaluate_json_gives_the_same_score_twice(dmipro_home: Path) -> None:
    with ThreadPoolExecutor(2) as pool:
        runs = list(
            pool.map(
                lambda home: dmipro_cli("evaluate", "examples/math_qa/job.yaml", "--json", home=home),
                [dmipro_home / "a", dmipro_home / "b"],
            )
        )
    results = []
    for proc in runs:
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert len(lines) == 1
        results.append(json.loads(lines[0]))
    first, second = results
    assert {"score", "n", "lm_calls", "tokens", "wall_s"} <= set(first)
    assert first["score"] == second["score"]
    assert first["n"] == 300 and first["lm_calls"] == 300 and first["tokens"] > 0 and first["wall_s"] > 0
    assert first["tokens"] == second["tokens"]
    # The command line reports what the Python API computes.
    assert dmipro.evaluate(JOB_FILE).score == first["score"]


def test_evaluate_prints_a_summary(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(math_job(10)))
    code, out, err = run_main(capsys, "evaluate", str(job), "--executor", "inline")
    assert code == 0
    assert "on 10 examples" in err and "10 LM calls" in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def sim_server(dmipro_home: Path) -> Iterator[str]:
    """``dmipro sim serve`` in its own process; yields its base URL and stops it with Ctrl+C."""
    port = _free_port()
    proc = subprocess.Popen(
        [str(DMIPRO), "sim", "serve", "--port", str(port)],
        cwd=REPO,
        env=_env(dmipro_home),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=1) as response:
                    models = json.load(response)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"dmipro sim serve did not start: {proc.communicate()[1]}") from None
                time.sleep(0.1)
        assert "sim-math" in [m["id"] for m in models["data"]]
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
    assert proc.returncode == 0 and "Traceback" not in err, err


@pytest.mark.slow
def test_the_same_score_over_http_as_in_process(sim_server: str, tmp_path: Path, dmipro_home: Path) -> None:
    n = 60
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records("dev", n)))
    spec: dict[str, Any] = math_job(n, valset="dev.jsonl", trainset="dev.jsonl")
    spec["lm"] = {
        "model": "openai/sim-math",
        "api_base": sim_server,
        "api_key_env": "SIM_API_KEY",
        "temperature": 0.0,
        "cache": False,
    }
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec))

    proc = dmipro_cli("evaluate", str(job), "--json", home=dmipro_home, SIM_API_KEY="x")
    assert proc.returncode == 0, proc.stderr
    over_http = json.loads(proc.stdout)
    in_process = dmipro.evaluate(math_job(n))
    assert over_http["n"] == n and over_http["lm_calls"] == n and over_http["tokens"] > 0
    assert over_http["score"] == in_process.score
    assert over_http["tokens"] == in_process.usage.tokens


def test_an_http_job_needs_its_key_variable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SIM_API_KEY", raising=False)
    spec = math_job(
        3, lm={"model": "openai/sim-math", "api_base": "http://127.0.0.1:9/v1", "api_key_env": "SIM_API_KEY"}
    )
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec))
    code, out, err = run_main(capsys, "evaluate", str(job))
    assert code == 2 and out == ""
    assert err.startswith("error: lm.api_key_env: ") and err.count("\n") == 1


def test_sim_describe(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "sim", "describe", "--json")
    assert code == 0
    info = json.loads(out)
    assert info["task"] == "math" and "optimum" in info and "baseline" in info
    code, _, err = run_main(capsys, "sim", "describe", "--task", "poetry")
    assert code == 2 and err.startswith("error: ") and "poetry" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["evaluate", "examples/math_qa/job.yaml", "--split", "bogus"], "bogus"),
        (["evaluate", "examples/math_qa/job.yaml", "--executor", "dask"], "dask"),
        (["validate", "no/such/job.yaml"], "does not exist"),
    ],
)
def test_errors_end_with_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    monkeypatch.chdir(REPO)
    code, out, err = run_main(capsys, *args)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_a_bad_settings_file_is_reported_like_any_other_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "dmipro.yaml"
    config.write_text("allowed_modules: [examples\n")
    monkeypatch.setenv("DMIPRO_CONFIG", str(config))
    with pytest.raises(ConfigError):
        reload_settings()
    code, out, err = run_main(capsys, "validate", str(JOB_FILE))
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and "not valid YAML" in err


def test_jobs_shows_whole_ids_when_piped(dmipro_home: Path) -> None:
    from dmipro.jobs import JobState, JobStore

    store = JobStore()
    long_id = "a-rather-long-job-name-for-the-nightly-math-qa-run-" + "0123456789ab"
    store.create(name="nightly", spec={"name": "nightly"}, executor="thread", job_id=long_id)
    store.finish(long_id, JobState.SUCCEEDED, result={})
    proc = dmipro_cli("jobs", home=dmipro_home, COLUMNS="60")  # piped, and a narrow width asked for
    assert proc.returncode == 0, proc.stderr
    (row,) = [line for line in proc.stdout.splitlines() if "succeeded" in line]
    assert long_id in row and "done" in row, proc.stdout
