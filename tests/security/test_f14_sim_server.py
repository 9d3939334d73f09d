"""Finding 14: ``dmipro sim serve`` caps ``n`` and warns when it listens beyond loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from tests.conftest import free_port
from tests.contract.workers import wait_for

REPO = Path(__file__).resolve().parents[2]


def _post(port: int, n: int) -> tuple[int, dict]:
    body = json.dumps({"model": "sim-math", "n": n,
                       "messages": [{"role": "user", "content": "What is 2 + 3?"}]}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_f14_the_simulator_server_caps_n_and_warns_on_all_interfaces(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "sim.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(REPO / ".venv" / "bin" / "dmipro"), "sim", "serve", "--host", "0.0.0.0",
                                 "--port", str(port)], cwd=REPO, env=dict(os.environ), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def up() -> bool:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
                return True
            except OSError:
                assert proc.poll() is None, log.read_text()
                return False

        wait_for(up, 60, "the simulator server")
        code, body = _post(port, 1_000_000)
        assert code == 400 and "n must be between 1 and 16" in body["error"]["message"]
        code, body = _post(port, 2)
        assert code == 200 and len(body["choices"]) == 2
        assert "warning: serving the simulator on 0.0.0.0" in log.read_text()
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(10)
