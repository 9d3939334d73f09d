"""Langfuse, against a recording server: the run's trace, its scores, and registry versions as prompts."""

from __future__ import annotations

from collections import Counter

import pytest

import dmipro.registry as registry
from dmipro import observability
from dmipro.config import Settings
from dmipro.events import Event
from dmipro.subscribers.langfuse import observation_id, prompt_names, trace_id
from tests.subscribers._support import FakeLangfuse, register_versions, run_tiny

LANGFUSE = Settings(subscribers=("langfuse",))


def test_trace_id_is_langfuses_own_seeded_id() -> None:
    from langfuse import Langfuse

    assert trace_id("job-42") == Langfuse.create_trace_id(seed="job-42")
    assert observation_id("job-42") != observation_id("job-42", "trial", 1)
    assert observation_id("job-42", "trial", 1) == observation_id("job-42", "trial", 1)


def test_a_run_is_one_trace_with_phases_trials_generations_and_scores(
    fake_langfuse: FakeLangfuse, recorded_events: list[Event]
) -> None:
    assert observability.setup(LANGFUSE) == ("langfuse",)
    job_id, summary = run_tiny()
    observability.shutdown()

    spans = fake_langfuse.spans()
    assert {s["trace_id"] for s in spans} == {trace_id(job_id)}
    by_name = Counter(s["name"].split(" ")[0] for s in spans)
    trials = [e for e in recorded_events if e.name == "dspy.optimization.trial_complete"]
    assert by_name["dmipro.optimize"] == 1
    assert by_name["dmipro.trial"] == len(trials) > 0
    for phase in ("bootstrap", "propose", "search"):
        assert by_name[f"dmipro.phase.{phase}"] == 1

    ids = {s["span_id"]: s for s in spans}
    root = next(s for s in spans if s["name"] == "dmipro.optimize")
    assert root["span_id"] == observation_id(job_id)
    assert root["attributes"]["langfuse.trace.name"] == f"dmipro optimize {job_id}"
    assert root["attributes"]["session.id"] == job_id
    for s in spans:
        if s["name"].startswith("dmipro.phase."):
            assert s["parent_span_id"] == root["span_id"]
        if s["name"].startswith("dmipro.trial "):
            n = int(s["name"].split(" ")[1])
            assert s["span_id"] == observation_id(job_id, "trial", n)
            assert ids[s["parent_span_id"]]["name"] == "dmipro.phase.search"

    generations = [s for s in spans if s["attributes"].get("langfuse.observation.type") == "generation"]
    assert len(generations) == summary["lm_calls"]
    tokens = 0
    for g in generations:
        assert g["attributes"]["langfuse.observation.model.name"] == "sim/math"
        assert ids[g["parent_span_id"]]["name"].startswith(("dmipro.trial", "dmipro.phase."))
        usage = _json(g["attributes"]["langfuse.observation.usage_details"])
        tokens += usage["input"] + usage["output"]
        assert "total" in _json(g["attributes"]["langfuse.observation.cost_details"])
        assert "langfuse.observation.input" not in g["attributes"]  # no text without capture_text
    assert tokens == summary["tokens"]

    scores = fake_langfuse.scores()
    trial_scores = [s for s in scores if s["name"] == "trial_score"]
    assert sorted(s["value"] for s in trial_scores) == sorted(e.data["score"] for e in trials)
    expected_ids = {observation_id(job_id, "trial", e.trial) for e in trials}
    assert {s["observationId"] for s in trial_scores} == expected_ids
    final = {s["name"]: s for s in scores if s["name"] != "trial_score"}
    assert final["baseline_score"]["value"] == summary["baseline_score"]
    assert final["best_score"]["value"] == summary["best_score"]
    assert final["improvement"]["value"] == pytest.approx(summary["best_score"] - summary["baseline_score"])
    assert "baseline" in final["improvement"]["comment"] and "optimized" in final["improvement"]["comment"]
    assert all(s["traceId"] == trace_id(job_id) for s in scores)


def test_registered_versions_become_prompts_and_production_follows_deploys(
    fake_langfuse: FakeLangfuse,
) -> None:
    observability.setup(LANGFUSE)
    infos = register_versions("job-7")
    assert [i.version for i in infos] == [1, 2]
    registry.deploy("math_qa", 1)
    observability.flush()
    assert _labels(fake_langfuse) == {1: ["production", "v1"], 2: ["v2"]}
    registry.deploy("math_qa", 2)
    observability.flush()
    assert _labels(fake_langfuse) == {1: ["v1"], 2: ["production", "v2"]}
    registry.rollback("math_qa")
    observability.shutdown()
    assert _labels(fake_langfuse) == {1: ["production", "v1"], 2: ["v2"]}

    created = fake_langfuse.calls("POST", "/api/public/v2/prompts")
    assert [r.body["name"] for r in created] == ["math_qa", "math_qa"]
    first = created[0].body
    assert first["type"] == "chat"
    assert first["prompt"][0] == {"role": "system", "content": "Solve it step by step, version 1."}
    assert first["prompt"][1]["role"] == "user" and "What is 2 + 3?" in first["prompt"][1]["content"]
    assert first["prompt"][2]["role"] == "assistant" and "answer: 5" in first["prompt"][2]["content"]
    meta = first["config"]["dmipro"]
    assert (meta["name"], meta["version"], meta["job_id"]) == ("math_qa", 1, "job-7")
    assert meta["best_score"] == 60.0
    assert [r.body["newLabels"] for r in fake_langfuse.calls("PATCH", "/api/public/v2/prompts/")] == [
        ["production", "v1"], ["production", "v2"], ["production", "v1"]
    ]


def test_a_deploy_of_a_version_pushed_by_another_process_finds_it_by_label(
    fake_langfuse: FakeLangfuse,
) -> None:
    observability.setup(LANGFUSE)
    register_versions("job-8")
    observability.shutdown()  # a new process knows nothing of what it pushed
    observability.setup(LANGFUSE)
    registry.deploy("math_qa", 2)
    observability.shutdown()
    assert fake_langfuse.calls("GET", "/api/public/v2/prompts/math_qa")
    assert len(fake_langfuse.calls("POST", "/api/public/v2/prompts")) == 2
    assert _labels(fake_langfuse) == {1: ["v1"], 2: ["production", "v2"]}


def test_prompt_names_per_predictor() -> None:
    assert prompt_names("qa", ["predict"]) == {"predict": "qa"}
    assert prompt_names("rag", ["retrieve", "answer"]) == {"retrieve": "rag/retrieve", "answer": "rag/answer"}


def test_off_without_keys_and_without_a_word(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("DEBUG"):
        assert observability.setup(LANGFUSE) == ()
    assert not [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")]


def _labels(fake: FakeLangfuse) -> dict[int, list[str]]:
    return {p.version: sorted(p.labels) for p in fake.prompts["math_qa"]}


def _json(text: str) -> dict[str, float]:
    import json

    value: dict[str, float] = json.loads(text)
    return value


def test_switched_off_and_on_again_it_still_sends(fake_langfuse: FakeLangfuse) -> None:
    observability.setup(LANGFUSE)
    observability.shutdown()
    observability.setup(LANGFUSE)
    job_id, _ = run_tiny()
    observability.shutdown()
    assert any(s["name"] == "dmipro.optimize" for s in fake_langfuse.spans())
    assert any(s["name"] == "best_score" for s in fake_langfuse.scores())


def test_generation_text_only_with_capture_text(fake_langfuse: FakeLangfuse) -> None:
    import dspy

    from dmipro.events import correlate
    from dmipro.lm._sim import sim_lm

    for capture in (False, True):
        job = f"job-capture-{capture}"
        observability.setup(Settings(subscribers=("langfuse",), capture_text=capture))
        with correlate(job_id=job), dspy.context(lm=sim_lm()):
            dspy.Predict("question -> answer")(question="What is 2 + 3?")
        observability.shutdown()
        (generation,) = [s for s in fake_langfuse.spans() if s["trace_id"] == trace_id(job)]
        assert generation["parent_span_id"] == observation_id(job)
        text = generation["attributes"].get("langfuse.observation.input", "")
        assert ("What is 2 + 3?" in text) is capture
