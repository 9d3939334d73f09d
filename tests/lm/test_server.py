"""The simulator over HTTP: OpenAI-compatible, and the same answers as in-process."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dspy
import pytest
from dspy.utils.exceptions import LMRateLimitError

from dmipro.errors import ConfigError
from dmipro.lm._sim import sim_lm
from dmipro.lm.server import SimHTTPServer, make_server, serve_in_thread

# litellm would otherwise try to download its price map at import time.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

DATA = Path(__file__).resolve().parents[2] / "examples" / "math_qa" / "data"


@pytest.fixture(scope="module")
def server() -> Iterator[SimHTTPServer]:
    srv = serve_in_thread()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def flaky_server() -> Iterator[SimHTTPServer]:
    srv = serve_in_thread(rate_limit_rate=1.0, retry_after_s=0.05)
    yield srv
    srv.shutdown()
    srv.server_close()


def _post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, str], dict[str, Any] | str]:
    request = urllib.request.Request(f"{url}/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read().decode()
            status, headers = response.status, dict(response.headers)
    except urllib.error.HTTPError as error:
        raw, status, headers = error.read().decode(), error.code, dict(error.headers)
    try:
        return status, headers, json.loads(raw)
    except ValueError:
        return status, headers, raw


QUESTION = "Ava has 12 apples. She buys 5 more apples at the market. How many apples does Ava have now?"
MESSAGES = [{"role": "system", "content": "Answer."}, {"role": "user", "content": QUESTION}]


def _questions(n: int) -> list[str]:
    return [json.loads(line)["question"] for line in (DATA / "dev.jsonl").read_text().splitlines()[:n]]


@pytest.mark.parametrize("engine", ["auto", "litellm"])
def test_http_round_trip_matches_in_process(server: SimHTTPServer, engine: str) -> None:
    from examples.math_qa.program import build

    program = build()
    questions = _questions(20)
    http = dspy.LM("openai/sim-math", api_base=server.url, api_key="x", cache=False, temperature=0.0,
                   engine=engine)
    with dspy.context(lm=http):
        remote = [program(question=q) for q in questions]
    with dspy.context(lm=sim_lm(temperature=0.0)):
        local = [program(question=q) for q in questions]
    assert [p.answer for p in remote] == [p.answer for p in local]
    assert [p.reasoning for p in remote] == [p.reasoning for p in local]
    assert http.history[-1]["usage"]["prompt_tokens"] > 0


def test_models_endpoint_lists_the_simulated_models(server: SimHTTPServer) -> None:
    with urllib.request.urlopen(f"{server.url}/models", timeout=10) as response:
        body = json.loads(response.read())
    assert "sim-math" in [model["id"] for model in body["data"]]


def test_chat_completion_shape(server: SimHTTPServer) -> None:
    status, _, body = _post(server.url, {"model": "sim/math", "messages": MESSAGES, "temperature": 0})
    assert status == 200 and isinstance(body, dict)
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_streaming_is_server_sent_events(server: SimHTTPServer) -> None:
    status, _, body = _post(server.url, {"model": "sim-math", "messages": MESSAGES, "stream": True})
    assert status == 200 and isinstance(body, str)
    assert body.startswith("data: {") and body.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize(
    ("body", "status"),
    [({"model": "gpt-4o", "messages": MESSAGES}, 404), ({"model": "sim-math", "messages": []}, 400),
     ({"model": "sim-math", "messages": MESSAGES, "temperature": "hot"}, 400)],
)
def test_bad_requests_are_refused(server: SimHTTPServer, body: dict[str, Any], status: int) -> None:
    got, _, payload = _post(server.url, body)
    assert got == status and isinstance(payload, dict) and payload["error"]["message"]


def test_rate_limit_is_429_with_retry_after(flaky_server: SimHTTPServer) -> None:
    status, headers, _ = _post(flaky_server.url, {"model": "sim-math", "messages": MESSAGES})
    assert status == 429
    lowered = {k.lower(): v for k, v in headers.items()}
    assert float(lowered["retry-after"]) == pytest.approx(0.05)
    assert lowered["retry-after-ms"] == "50"
    lm = dspy.LM("openai/sim-math", api_base=flaky_server.url, api_key="x", cache=False, num_retries=1)
    with dspy.context(lm=lm), pytest.raises(LMRateLimitError) as raised:
        dspy.Predict("question -> answer")(question=QUESTION)
    assert raised.value.retry_after == pytest.approx(0.05)


def test_server_errors_are_500() -> None:
    srv = serve_in_thread(server_error_rate=1.0)
    try:
        status, _, body = _post(srv.url, {"model": "sim-math", "messages": MESSAGES})
    finally:
        srv.shutdown()
        srv.server_close()
    assert status == 500 and isinstance(body, dict) and body["error"]["type"] == "server_error"


def test_unknown_options_are_refused() -> None:
    with pytest.raises(ConfigError):
        make_server(port=0, flakiness=0.5)
