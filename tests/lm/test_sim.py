"""SimLM through the real DSPy stack: adapters, determinism, the response surface, failures."""

from __future__ import annotations

import asyncio
import inspect
import json
import statistics
import time
from pathlib import Path
from typing import Any, Literal

import dspy
import pytest
from dspy.lm15 import Config, Message, Request
from dspy.propose.dataset_summary_generator import DatasetDescriptorWithPriorObservations
from dspy.propose.grounded_proposer import TIPS, DescribeModule, DescribeProgram, generate_instruction_class
from dspy.utils.exceptions import AdapterParseError, LMRateLimitError, LMServerError, LMTimeoutError
from pydantic import BaseModel

from dmipro.errors import ConfigError
from dmipro.lm import _surface
from dmipro.lm._math import parse, steps
from dmipro.lm._prompt import _read_prompt
from dmipro.lm._sim import (
    OPTIMAL_INSTRUCTION,
    SIM_OPTIONS,
    SimEngine,
    describe,
    instruction_effect,
    sim_lm,
)

DATA = Path(__file__).resolve().parents[2] / "examples" / "math_qa" / "data"
QUESTION = "Ava has 12 apples. She buys 5 more apples at the market. How many apples does Ava have now?"


def _load(split: str) -> list[dspy.Example]:
    lines = (DATA / f"{split}.jsonl").read_text().splitlines()
    return [dspy.Example(**json.loads(line)).with_inputs("question") for line in lines]


@pytest.fixture(scope="module")
def dev() -> list[dspy.Example]:
    return _load("dev")


@pytest.fixture(scope="module")
def train() -> list[dspy.Example]:
    return _load("train")


def _cot(instruction: str | None = None, demos: list[dspy.Example] | None = None) -> dspy.Module:
    from examples.math_qa.program import build

    program = build()
    predictor = program.predict  # type: ignore[attr-defined]
    if instruction is not None:
        predictor.signature = predictor.signature.with_instructions(instruction)
    predictor.demos = demos or []
    return program


def _accuracy(program: dspy.Module, data: list[dspy.Example], lm: dspy.LM | None = None) -> float:
    from examples.math_qa.program import exact_match

    with dspy.context(lm=lm or sim_lm(temperature=0.0)):
        return statistics.mean(exact_match(ex, program(question=ex.question)) for ex in data)


def _reasoned(examples: list[dspy.Example]) -> list[dspy.Example]:
    return [dspy.Example(question=ex.question, reasoning=" ".join(steps(ex.question) or []), answer=ex.answer)
            for ex in examples]


# --- determinism ------------------------------------------------------------------------------


def test_same_prompt_gives_the_same_answer(dev: list[dspy.Example]) -> None:
    program = _cot()
    questions = [ex.question for ex in dev[:40]]
    with dspy.context(lm=sim_lm(temperature=0.0)):
        first = [program(question=q).answer for q in questions]
        again = [program(question=q).answer for q in questions]
    with dspy.context(lm=sim_lm(temperature=0.0)):
        fresh = [program(question=q).answer for q in questions]
    assert first == again == fresh


def test_seed_and_temperature_change_the_draws(dev: list[dspy.Example]) -> None:
    program = _cot()
    questions = [ex.question for ex in dev[:150]]

    def answers(**options: Any) -> list[str]:
        with dspy.context(lm=sim_lm(**options)):
            return [program(question=q).answer for q in questions]

    base = answers(temperature=0.0)
    assert base != answers(temperature=0.0, seed=1)
    assert base != answers(temperature=1.0)


# --- the response surface ---------------------------------------------------------------------


def test_best_prompt_beats_the_bare_program_by_15_points(dev: list[dspy.Example],
                                                          train: list[dspy.Example]) -> None:
    assert len(dev) >= 150
    bare = _accuracy(_cot(), dev)
    best = _accuracy(_cot(OPTIMAL_INSTRUCTION, _reasoned(train[:4])), dev)
    assert 0.40 <= bare <= 0.55
    assert best - bare >= 0.15


def test_each_lever_moves_accuracy_the_documented_way(dev: list[dspy.Example],
                                                       train: list[dspy.Example]) -> None:
    data = dev[:200]
    bare = _accuracy(_cot(), data)
    assert _accuracy(_cot(OPTIMAL_INSTRUCTION), data) > bare + 0.1
    assert _accuracy(_cot("Make your best guess and be brief."), data) < bare - 0.1
    assert _accuracy(_cot(demos=_reasoned(train[:4])), data) > bare + 0.1
    wrong = [dspy.Example(question=ex.question, answer=str(int(ex.answer) + 3)) for ex in train[:4]]
    assert _accuracy(_cot(demos=wrong), data) < bare - 0.1


def test_reasoned_demos_count_more_than_labels_and_returns_diminish(train: list[dspy.Example]) -> None:
    program = _cot()
    adapter = dspy.ChatAdapter()

    def logit(demos: list[dspy.Example]) -> float:
        messages = adapter.format(program.predict.signature, demos, {"question": train[-1].question})  # type: ignore[attr-defined]
        prompt = _read_prompt(messages[0]["content"], [(m["role"], m["content"]) for m in messages[1:]])
        return _surface._demos_effect(prompt, "answer")

    labeled = [dspy.Example(question=ex.question, answer=ex.answer) for ex in train[:8]]
    reasoned = _reasoned(train[:8])
    assert logit(reasoned[:1]) > logit(labeled[:1]) > 0
    gains = [logit(reasoned[: k + 1]) - logit(reasoned[:k]) for k in range(6)]
    assert gains[0] > gains[1] > gains[2] > gains[3] > 0
    assert gains[4] == gains[5] == 0


def test_phrase_pools_have_the_effects_they_are_filed_under() -> None:
    for sentence in _surface._HELPFUL:
        assert instruction_effect(sentence) > 0, sentence
    for sentence in _surface._HARMFUL:
        assert instruction_effect(sentence) < 0, sentence
    for sentence in _surface._NEUTRAL + _surface._OPENINGS:
        assert instruction_effect(sentence.format(basic="Answer the arithmetic word problem.")) == 0, sentence
    assert instruction_effect(OPTIMAL_INSTRUCTION) == _surface.PHRASE_CLAMP[1]
    assert instruction_effect(dspy.ChainOfThought("question -> answer").predict.signature.instructions) == 0


def test_describe_exposes_the_surface() -> None:
    info = describe("math")
    assert {"phrases", "demos", "difficulty_penalty", "base_logit", "optimum", "baseline"} <= set(info)
    assert info["optimum"]["instruction"] == OPTIMAL_INSTRUCTION
    best = statistics.mean(info["optimum"]["expected_accuracy"].values())
    base = statistics.mean(info["baseline"]["expected_accuracy"].values())
    assert best - base > 0.3
    assert json.loads(json.dumps(info))  # JSON-ready for `dmipro sim describe --json`
    with pytest.raises(ConfigError):
        describe("chess")


def test_multistage_plan_feeds_the_solver(dev: list[dspy.Example]) -> None:
    from examples.multistage.program import build

    program = build()
    with dspy.context(lm=sim_lm(temperature=0.0)):
        result = program(question=dev[0].question)
    assert "1. Start from" in result.plan
    assert result.answer.strip().lstrip("-").isdigit()
    problem = parse(dev[0].question)
    assert problem is not None
    good = "\n".join(
        f"{i}. {_surface._PLAN_WORDS[op].capitalize()} {n}." for i, (op, n) in enumerate(problem.ops, start=2)
    )
    inputs = {"question": dev[0].question, "plan": good}
    messages = dspy.ChatAdapter().format(program.solve.predict.signature, [], inputs)
    prompt = _read_prompt(messages[0]["content"], [(m["role"], m["content"]) for m in messages[1:]])
    assert _surface._plan_effect(prompt, problem) == _surface.PLAN_MATCH


# --- adapters ---------------------------------------------------------------------------------


class Item(BaseModel):
    name: str
    qty: int


class Everything(dspy.Signature):
    """Fill every field."""

    question: str = dspy.InputField()
    count: int = dspy.OutputField()
    score: float = dspy.OutputField()
    ok: bool = dspy.OutputField()
    tags: list[str] = dspy.OutputField()
    label: Literal["pos", "neg", "neutral"] = dspy.OutputField()
    meta: dict[str, int] = dspy.OutputField()
    item: Item = dspy.OutputField()
    items: list[Item] = dspy.OutputField()
    note: str = dspy.OutputField()


@pytest.mark.parametrize("adapter", [dspy.ChatAdapter(), dspy.JSONAdapter(), dspy.XMLAdapter()],
                         ids=["chat", "json", "xml"])
def test_every_adapter_parses_typed_filler(adapter: dspy.Adapter) -> None:
    lm = sim_lm()
    with dspy.context(lm=lm, adapter=adapter):
        result = dspy.Predict(Everything)(question="Describe the weather.")
    assert isinstance(result.count, int) and isinstance(result.score, float) and isinstance(result.ok, bool)
    assert result.label in ("pos", "neg", "neutral") and isinstance(result.item, Item)
    assert all(isinstance(tag, str) for tag in result.tags) and isinstance(result.meta, dict)
    # The adapter that asked parsed the first reply itself (no fallback to another adapter).
    assert len(lm.history) == 1


@pytest.mark.parametrize("adapter", [dspy.ChatAdapter(), dspy.JSONAdapter(), dspy.XMLAdapter()],
                         ids=["chat", "json", "xml"])
def test_math_answers_do_not_depend_on_the_adapter(adapter: dspy.Adapter, dev: list[dspy.Example],
                                                   train: list[dspy.Example]) -> None:
    program = _cot(demos=_reasoned(train[:2]))
    questions = [ex.question for ex in dev[:25]]
    with dspy.context(lm=sim_lm(temperature=0.0), adapter=dspy.ChatAdapter()):
        reference = [program(question=q).answer for q in questions]
    lm = sim_lm(temperature=0.0)
    with dspy.context(lm=lm, adapter=adapter):
        answers = [program(question=q).answer for q in questions]
    assert answers == reference
    assert len(lm.history) == len(questions)
    last = lm.history[-1]["outputs"][0]
    if isinstance(adapter, dspy.JSONAdapter):
        assert set(json.loads(last)) == {"reasoning", "answer"}
    elif isinstance(adapter, dspy.XMLAdapter):
        assert last.startswith("<reasoning>")
    else:
        assert last.rstrip().endswith("[[ ## completed ## ]]")


def test_usage_is_reported() -> None:
    lm = sim_lm()
    with dspy.context(lm=lm):
        dspy.Predict("question -> answer")(question=QUESTION)
    usage = lm.history[-1]["usage"]
    prompt_chars = sum(len(m["content"]) for m in lm.history[-1]["messages"])
    assert usage["prompt_tokens"] == pytest.approx(prompt_chars / 4, rel=0.05)
    assert 0 < usage["completion_tokens"] < usage["prompt_tokens"]


def test_async_calls_work() -> None:
    program = dspy.ChainOfThought("question -> answer")
    question = "Ava has 3 apples. She buys 2 more apples at the market. How many apples does Ava have now?"
    with dspy.context(lm=sim_lm(temperature=0.0)):
        sync = program(question=question).answer
        result = asyncio.run(program.acall(question=question))
    assert result.answer == sync


def test_stream_yields_the_completion() -> None:
    engine = SimEngine()
    request = Request(model="sim/math", messages=(Message.user("Hello?"),), config=Config(temperature=0.0))
    events = list(engine.stream(request))
    assert events[0].type == "start" and events[-1].type == "end"
    text = "".join(getattr(getattr(e, "delta", None), "text", "") for e in events)
    assert text == engine.complete(request).text


def test_lm_state_round_trips() -> None:
    lm = sim_lm(seed=7, latency_ms=0.0)
    state = lm.dump_state()
    loaded = dspy.LM.load_state(state, allow_custom_lm_class=True)
    assert isinstance(loaded.engine, SimEngine) and loaded.engine.seed == 7


# --- the proposer -----------------------------------------------------------------------------


def _propose(tip: str, demos: str, lm: dspy.LM) -> str:
    with dspy.context(lm=lm):
        return str(generate_instruction_class(program_aware=True)(
            dataset_description="Arithmetic word problems with whole-number answers.",
            program_code="dspy.ChainOfThought(MathQA)",
            program_description="Answers word problems.",
            module="ChainOfThought(question) -> answer",
            module_description="Produces the answer.",
            task_demos=demos,
            previous_instructions="",
            basic_instruction="Answer the arithmetic word problem.",
            tip=tip,
        ).proposed_instruction)


def test_proposals_vary_with_tip_and_demos_and_differ_in_quality() -> None:
    lm = sim_lm(temperature=1.0)
    proposals = {
        key: [_propose(tip, f"Question: example {i}\nAnswer: {i}\n\n", lm) for i in range(15)]
        for key, tip in TIPS.items()
    }
    assert len({text for texts in proposals.values() for text in texts}) > 60

    def sentences(key: str) -> float:
        return statistics.mean(text.count(". ") + 1 for text in proposals[key])

    assert sentences("simple") + 1.5 < sentences("description")
    assert all(text.startswith("You are") for text in proposals["persona"])
    effects = [instruction_effect(text) for texts in proposals.values() for text in texts]
    assert max(effects) > 0.5 and min(effects) < 0
    assert _propose(TIPS["simple"], "x", lm) == _propose(TIPS["simple"], "x", lm)


def test_dataset_describer_sometimes_says_complete() -> None:
    replies = []
    with dspy.context(lm=sim_lm(temperature=1.0)):
        for i in range(40):
            replies.append(dspy.Predict(DatasetDescriptorWithPriorObservations)(
                examples=f"[Example({i})]", prior_observations="Short arithmetic problems.").observations)
    complete = sum(reply.startswith("COMPLETE") for reply in replies)
    assert 0 < complete < len(replies)


def test_program_and_module_descriptions_are_text() -> None:
    with dspy.context(lm=sim_lm(temperature=1.0)):
        program = dspy.Predict(DescribeProgram)(program_code="code", program_example="ex").program_description
        module = dspy.Predict(DescribeModule)(
            program_code="code", program_example="ex", program_description=program,
            module="Predict(question) -> answer",
        ).module_description
    assert len(program) > 20 and len(module) > 20


# --- options and injected failures ------------------------------------------------------------


def test_options_are_validated() -> None:
    assert SIM_OPTIONS == set(inspect.signature(SimEngine.__init__).parameters) - {"self"}
    with pytest.raises(ConfigError):
        SimEngine(task="chess")
    with pytest.raises(ConfigError):
        SimEngine(rate_limit_rate=1.5)
    with pytest.raises(ConfigError):
        SimEngine(latency_dist="uniform")
    with pytest.raises(ConfigError):
        sim_lm("openai/gpt-4o")
    assert sim_lm("sim/math", temperature=0.5).kwargs["temperature"] == 0.5


@pytest.mark.parametrize(
    ("option", "error"),
    [
        ("rate_limit_rate", LMRateLimitError),
        ("server_error_rate", LMServerError),
        ("timeout_rate", LMTimeoutError),
    ],
)
def test_injected_failures_raise_what_dspy_retries(option: str, error: type[Exception]) -> None:
    retries = 2 if option == "rate_limit_rate" else 0
    lm = sim_lm(num_retries=retries, retry_after_s=0.0, **{option: 1.0})
    with dspy.context(lm=lm), pytest.raises(error) as raised:
        dspy.Predict("question -> answer")(question=QUESTION)
    engine = lm.engine
    assert isinstance(engine, SimEngine)
    assert sum(engine._attempts.values()) == retries + 1
    if option == "rate_limit_rate":
        assert raised.value.retry_after == 0.0  # type: ignore[attr-defined]


def test_malformed_outputs_fail_to_parse() -> None:
    with dspy.context(lm=sim_lm(malformed_rate=1.0)), pytest.raises(AdapterParseError):
        dspy.Predict("question -> answer")(question=QUESTION)


def test_failures_are_deterministic_and_retries_recover(dev: list[dspy.Example]) -> None:
    adapter = dspy.ChatAdapter()
    signature = dspy.ChainOfThought("question -> answer").predict.signature
    prompts = []
    for ex in dev[:60]:
        messages = adapter.format(signature, [], {"question": ex.question})
        prompts.append((messages[0]["content"], [(m["role"], m["content"]) for m in messages[1:]]))

    def pattern(engine: SimEngine) -> list[str]:
        kinds = []
        for system, messages in prompts:
            try:
                engine.respond(system, messages, temperature=0.0)
                kinds.append("ok")
            except Exception as exc:  # the class name is what is compared
                kinds.append(type(exc).__name__)
        return kinds

    options = {"rate_limit_rate": 0.2, "server_error_rate": 0.1, "timeout_rate": 0.1, "seed": 3}
    first = pattern(SimEngine(**options))  # type: ignore[arg-type]
    assert first == pattern(SimEngine(**options))  # type: ignore[arg-type]
    assert {"ok", "RateLimitError", "ServerError", "TimeoutError"} <= set(first)

    questions = [ex.question for ex in dev[:20]]
    program = dspy.ChainOfThought("question -> answer")
    with dspy.context(lm=sim_lm(temperature=0.0)):
        clean = [program(question=q).answer for q in questions]
    flaky = sim_lm(temperature=0.0, rate_limit_rate=0.3, retry_after_s=0.0, num_retries=8)
    with dspy.context(lm=flaky):
        recovered = [program(question=q).answer for q in questions]
    assert recovered == clean
    assert isinstance(flaky.engine, SimEngine) and sum(flaky.engine._attempts.values()) > len(questions)


def test_latency_is_slept() -> None:
    lm = sim_lm(latency_ms=30.0)
    start = time.perf_counter()
    with dspy.context(lm=lm):
        dspy.Predict("question -> answer")(question=QUESTION)
    assert time.perf_counter() - start >= 0.03
    lognormal = SimEngine(latency_ms=10.0, latency_dist="lognormal", latency_sigma=0.5)
    draws = [lognormal._latency(bytes([i]) * 16, 0) for i in range(200)]
    assert draws == [lognormal._latency(bytes([i]) * 16, 0) for i in range(200)]
    assert 0.008 < statistics.median(draws) < 0.0125 and max(draws) > 2 * min(draws)
    assert SimEngine(latency_ms=10.0)._latency(b"x" * 16, 0) == 0.01
