"""Finding 11: ``dmipro flower`` refuses a non-loopback bind without auth; auth comes from the environment."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.contract.workers import REPO, Stack, wait_for

pytestmark = pytest.mark.integration

DMIPRO = str(REPO / ".venv" / "bin" / "dmipro")


def _env(stack: Stack, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in stack.envs["celery"].items() if not k.startswith("FLOWER_")}
    env.update(extra)
    return env


def test_f11_flower_on_all_interfaces_needs_auth_from_the_environment(celery_stack: Stack,
                                                                      tmp_path: Path) -> None:
    port = free_port()
    refused = subprocess.run([DMIPRO, "flower", "--address", "0.0.0.0", "--port", str(port)], cwd=REPO,
                             env=_env(celery_stack), capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "without auth" in refused.stderr and "FLOWER_BASIC_AUTH" in refused.stderr
    on_cli = subprocess.run([DMIPRO, "flower", "--basic-auth", "admin:hunter2", "--port", str(port)],
                            cwd=REPO, env=_env(celery_stack), capture_output=True, text=True, timeout=60)
    assert on_cli.returncode == 2 and "FLOWER_BASIC_AUTH" in on_cli.stderr

    log = (tmp_path / "flower.log").open("wb")
    proc = subprocess.Popen([DMIPRO, "flower", "--address", "0.0.0.0", "--port", str(port)], cwd=REPO,
                            env=_env(celery_stack, FLOWER_BASIC_AUTH="admin:s3cret-pw"), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    try:
        def status(path: str, auth: str | None = None) -> int | None:
            request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
            if auth:
                request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    return int(response.status)
            except urllib.error.HTTPError as exc:
                return exc.code
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if proc.poll() is not None:
                    pytest.fail((tmp_path / "flower.log").read_text())
                return None

        wait_for(lambda: status("/healthcheck") is not None, 60, "flower to listen", interval=0.2)
        assert status("/") == 401 and status("/tasks") == 401  # the whole UI, not only /api
        assert status("/", "admin:s3cret-pw") == 200
        assert "s3cret-pw" not in " ".join(open(f"/proc/{proc.pid}/cmdline").read().split("\0"))
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
