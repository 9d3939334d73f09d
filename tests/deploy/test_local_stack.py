"""deploy/local-stack.sh, end to end, as an operator runs it.

``up`` starts Redis (with a password), a coordinator worker, two work workers and Flower;
a small math_qa job is submitted with the CLI and waited for; Flower's API shows its
coordinator and work tasks; ``down`` stops everything and every process is gone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, need

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "local-stack.sh"
DMIPRO = Path(sys.executable).parent / "dmipro"
PROCESSES = ["redis", "coordinator", "work-1", "work-2", "flower"]

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie waiting to be reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _run(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _stack(env: dict[str, str], command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return _run(["bash", str(SCRIPT), command], env, timeout)


def _logs(stack_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(stack_dir.glob("*.log")))


def _flower(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return json.loads(response.read())


def _job_dir(tmp_path: Path) -> Path:
    """math_qa with small counts (20 train, 20 val, 3 candidates, 4 trials) on the simulated LM."""
    job = tmp_path / "job"
    job.mkdir()
    data = REPO / "examples" / "math_qa" / "data"
    for split, name in (("train", "train.jsonl"), ("dev", "dev.jsonl")):
        lines = (data / f"{split}.jsonl").read_text().splitlines()[:20]
        (job / name).write_text("\n".join(lines) + "\n")
    (job / "job.yaml").write_text(
        "name: local_stack\n"
        "program: examples.math_qa.program:build\n"
        "metric: examples.math_qa.program:exact_match\n"
        "trainset: train.jsonl\n"
        "valset: dev.jsonl\n"
        "input_keys: [question]\n"
        "lm: {model: sim/math, temperature: 0.0}\n"
        "prompt_lm: {model: sim/math, temperature: 1.0}\n"
        "optimizer: {auto: null, num_candidates: 3, num_trials: 4, minibatch_size: 10, seed: 9}\n"
        "executor: {backend: celery, concurrency: 8}\n"
    )
    return job


def test_up_submit_wait_down(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        need("redis-server and redis-cli are not installed (apt-get install redis-server)")
    redis_port, flower_port = free_port(), free_port()
    stack_dir = tmp_path / "stack"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DMIPRO_", "FLOWER_", "REDIS"))}
    env.update(
        {
            "PYTHON": sys.executable,
            "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
            "DMIPRO_STACK_DIR": str(stack_dir),
            "DMIPRO_HOME": str(tmp_path / "home"),
            "DMIPRO_CONFIG": str(tmp_path / "no-dmipro.yaml"),
            "DMIPRO_ALLOWED_MODULES": "examples",
            "REDIS_PORT": str(redis_port),
            "FLOWER_PORT": str(flower_port),
            "STOP_TIMEOUT_S": "30",
        }
    )
    pids: dict[str, int] = {}
    try:
        up = _stack(env, "up")
        for name in PROCESSES:
            pidfile = stack_dir / f"{name}.pid"
            if pidfile.exists():
                pids[name] = int(pidfile.read_text())
        assert up.returncode == 0, f"{up.stderr}\n{_logs(stack_dir)}"
        assert sorted(pids) == sorted(PROCESSES)

        # `up` prints the clients' environment: a password-protected local Redis, SQLite allowed.
        client = dict(line.removeprefix("export ").split("=", 1) for line in up.stdout.splitlines())
        assert client["DMIPRO_BROKER_URL"].startswith("redis://:")
        assert client["DMIPRO_BROKER_URL"].endswith(f"@127.0.0.1:{redis_port}/0")
        assert client["DMIPRO_DATABASE_URL"] == f"sqlite:///{tmp_path / 'home'}/dmipro.db"
        assert client["DMIPRO_ALLOW_SQLITE_REMOTE"] == "1"
        password = (stack_dir / "redis.password").read_text()
        assert password in client["DMIPRO_BROKER_URL"]
        assert (stack_dir / "redis.password").stat().st_mode & 0o077 == 0
        assert password not in Path(f"/proc/{pids['redis']}/cmdline").read_text()
        noauth = _run(["redis-cli", "-p", str(redis_port), "ping"], {"PATH": os.environ["PATH"]}, 10)
        assert "NOAUTH" in noauth.stdout + noauth.stderr

        status = _stack(env, "status", timeout=30)
        assert status.returncode == 0, status.stdout
        assert [line.split(":")[0] for line in status.stdout.splitlines()] == PROCESSES

        cli_env = {**env, **client}
        job_dir = _job_dir(tmp_path)
        submitted = _run(
            [str(DMIPRO), "submit", str(job_dir / "job.yaml"), "--executor", "celery", "--json"], cli_env, 60
        )
        assert submitted.returncode == 0, submitted.stderr
        job_id = json.loads(submitted.stdout)["job_id"]
        waited = _run([str(DMIPRO), "wait", job_id, "--timeout", "60", "--json"], cli_env, 90)
        assert waited.returncode == 0, f"{waited.stdout}\n{waited.stderr}\n{_logs(stack_dir)}"
        result = json.loads(waited.stdout)
        assert result["state"] == "succeeded"
        assert result["executor"] == "celery"
        assert result["trials_done"] == result["trials_total"] == 4
        assert result["lm_errors"] == 0 and result["error"] is None
        assert 0 <= result["baseline_score"] <= result["best_score"] <= 100
        program = json.loads(Path(result["program_path"]).read_text())
        assert program  # the optimized program, as DSPy JSON, under the stack's DMIPRO_HOME

        # `celery inspect`, as docs/operations.md says, with the environment `up` printed.
        inspect = _run(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "dmipro.workers.celery_app",
                "inspect",
                "active_queues",
                "--json",
            ],
            cli_env,
            60,
        )
        assert inspect.returncode == 0, inspect.stderr
        queues = {w.split("@")[0]: {q["name"] for q in qs} for w, qs in json.loads(inspect.stdout).items()}
        assert queues == {
            "coordinator": {"dmipro.coordinator"},
            "work-1": {"dmipro.work"},
            "work-2": {"dmipro.work"},
        }

        # Flower watched it: the coordinator task on the coordinator, evaluations on the work workers.
        workers = _flower(flower_port, "/api/workers?refresh=1")
        assert {name.split("@")[0] for name in workers} == {"coordinator", "work-1", "work-2"}
        coordinator = _flower(flower_port, f"/api/task/info/optimize-{job_id}")
        assert coordinator["state"] == "SUCCESS" and coordinator["worker"].startswith("coordinator@")
        evaluations = _flower(flower_port, "/api/tasks?taskname=dmipro.evaluate_chunk")
        assert evaluations and {t["state"] for t in evaluations.values()} == {"SUCCESS"}
        assert {t["worker"].split("@")[0] for t in evaluations.values()} <= {"work-1", "work-2"}
    finally:
        down = _stack(env, "down")
        leftover = {name: pid for name, pid in pids.items() if _alive(pid)}
        for pid in leftover.values():
            os.kill(pid, signal.SIGKILL)  # only what this test started
    assert down.returncode == 0, down.stderr
    assert leftover == {}
    assert not list(stack_dir.glob("*.pid"))
    status = _stack(env, "status", timeout=30)
    assert status.returncode == 3
    assert status.stdout.splitlines() == [f"{name}: stopped" for name in PROCESSES]


def test_env_uses_the_database_and_broker_it_is_given(tmp_path: Path) -> None:
    """PostgreSQL (or any server) instead of SQLite, an existing broker instead of a local Redis."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DMIPRO_", "REDIS"))}
    env["DMIPRO_STACK_DIR"] = str(tmp_path / "stack")
    pg = "postgresql+psycopg://dmipro@db.internal:5432/dmipro"
    broker = "redis://:secret@redis.internal:6379/0"
    given = _stack({**env, "DMIPRO_DATABASE_URL": pg, "DMIPRO_BROKER_URL": broker}, "env", timeout=30)
    assert given.returncode == 0, given.stderr
    lines = given.stdout.splitlines()
    assert f"export DMIPRO_DATABASE_URL={pg}" in lines
    assert f"export DMIPRO_BROKER_URL={broker}" in lines
    assert f"export DMIPRO_RESULT_BACKEND={broker}" in lines
    assert not any("DMIPRO_ALLOW_SQLITE_REMOTE" in line for line in lines)
    status = _stack({**env, "DMIPRO_DATABASE_URL": pg, "DMIPRO_BROKER_URL": broker}, "status", timeout=30)
    assert status.returncode == 3
    assert [line.split(":")[0] for line in status.stdout.splitlines()] == [
        p for p in PROCESSES if p != "redis"
    ]
    wrong = _stack(env, "restart", timeout=30)
    assert wrong.returncode == 2 and "usage:" in wrong.stderr
