"""The simulated model's answers: the response surface of each task and the proposer's text.

Response surface of the ``math`` task
-------------------------------------
For a question :func:`dmipro.lm._math.solve` can parse, the answer field (``answer``, else
the last output field) is correct with probability ``p = sigmoid(logit)``::

    logit = BASE_LOGIT (0.5)
          + REASONING_BONUS (0.4)       if a reasoning field comes before the answer
          + clamp(sum of instruction phrase weights, -2.0, +1.4)
          + demo effect                 correct demos help with diminishing returns
          + plan effect                 an input plan that matches / contradicts the question
          - DIFFICULTY_PENALTY[level]   level 1: 0, level 2: 0.9, level 3: 1.8

Instruction phrases (regular expressions over the instruction; see ``PHRASES``):
step-by-step reasoning +0.6, "final answer as a single number" +0.5, verify/double-check
+0.4, identify the quantities +0.3, apply operations in order +0.25, a careful math persona
+0.2; guessing/estimating -0.8, answering in words -0.7, "be brief"/skip the reasoning
-0.6, creativity -0.4, rushing -0.3, high-stakes pressure -0.2.

Demos: each demo whose answer is right (checked with ``solve``) adds 0.45 when it carries
reasoning (a bootstrapped demo) and 0.3 when it is a bare labeled example; the k-th best
is scaled by 1.0, 0.8, 0.6, 0.4 and demos past the fourth add nothing. A demo with a
wrong answer subtracts 0.6. An input field named like ``plan`` that lists the question's
operations in order ("Add 5.", "Multiply by 3.") adds 0.5; one that contradicts them
subtracts 0.5. A wrong answer is a nearby integer — an arithmetic slip, a skipped last
step or a swapped operation — and the reasoning field walks to it.

The optimum is an instruction that combines the helpful phrases (``OPTIMAL_INSTRUCTION``
reaches the +1.4 clamp) with four correct, reasoned demos (+1.26): an expected 92% over
equal shares of the three levels, against 50% for a bare ``dspy.ChainOfThought`` with
DSPy's default instruction (on the shipped math_qa dev set: 87% against 49%).
:func:`describe` returns all of this as data.

Proposer fields (``proposed_instruction``, ``observations``, ``summary``,
``program_description``, ``module_description``) get text whose sentences are drawn by a
hash of the whole prompt from pools of helpful, neutral and harmful phrases, so a different
tip, demo set or data summary yields an instruction of different quality. Tips shift the
mix: "clear and concise" writes fewer sentences, "descriptive" more, "creative" leans
harmful, "persona" opens with a persona, "high stakes" adds pressure. With a
``prior_observations`` input, ``observations`` sometimes answers ``COMPLETE``. Any other
field gets plausible filler of its declared type (see :mod:`dmipro.lm._prompt`).

Determinism
-----------
The math draw hashes (instruction, demos, question, temperature, seed); with probability
0.5 it is replaced by a per-question "hardness" number that every prompt shares, so two
prompts disagree less often than independent coins would.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from dmipro.errors import ConfigError
from dmipro.lm import _math
from dmipro.lm._prompt import _Field, _filler, _Prompt

TASKS = ("math",)
"""Tasks the simulator knows; the model string ``sim/<task>`` picks one."""

# --- the response surface ------------------------------------------------------------------

BASE_LOGIT = 0.5
REASONING_BONUS = 0.4
DIFFICULTY_PENALTY = {1: 0.0, 2: 0.9, 3: 1.8}
PHRASE_CLAMP = (-2.0, 1.4)
DEMO_REASONED = 0.45
DEMO_LABELED = 0.3
DEMO_WRONG = -0.6
DEMO_DECAY = (1.0, 0.8, 0.6, 0.4)
PLAN_MATCH = 0.5
PLAN_MISMATCH = -0.5
QUESTION_SHARE = 0.5
COMPLETE_RATE = 0.35


@dataclass(frozen=True)
class Phrase:
    """An instruction feature: its ``weight`` is added to the logit when ``pattern`` matches."""

    name: str
    weight: float
    pattern: re.Pattern[str]
    example: str


def _phrase(name: str, weight: float, pattern: str, example: str) -> Phrase:
    return Phrase(name, weight, re.compile(pattern, re.IGNORECASE), example)


PHRASES: tuple[Phrase, ...] = (
    _phrase(
        "step_by_step", 0.6,
        r"step[- ]by[- ]step|show (?:your|each|all|the) (?:work|steps?)|work through|"
        r"reason (?:carefully|through)|think (?:carefully|through)|one operation at a time",
        "Think step by step.",
    ),
    _phrase(
        "final_number", 0.5,
        r"final answer[^.]{0,40}\b(?:single|one|only|just)\b[^.]{0,20}\b(?:number|integer|numeral)|"
        r"\b(?:single|one) (?:integer|number|numeral)\b|only the (?:final )?(?:number|integer)",
        "Give the final answer as a single number.",
    ),
    _phrase(
        "verify", 0.4,
        r"\bverify|double[- ]check|re-?check|"
        r"check (?:your|the|each|every) (?:arithmetic|calculation|work|result)",
        "Double-check the arithmetic.",
    ),
    _phrase(
        "quantities", 0.3,
        r"(?:identify|track|list|note|extract) (?:each|every|all|the) "
        r"(?:relevant )?(?:quantit|number|amount)",
        "Identify every quantity in the problem.",
    ),
    _phrase(
        "operations", 0.25,
        r"(?:each|every) operation in (?:the )?order|order of (?:the )?operations|which operation",
        "Apply each operation in the order the story describes.",
    ),
    _phrase(
        "persona", 0.2,
        r"\byou are an? (?:careful|meticulous|expert|experienced|patient|precise)\b[^.]{0,30}"
        r"(?:math|arithmetic|accountant|tutor|teacher|mathematician)",
        "You are a meticulous math tutor.",
    ),
    _phrase(
        "guess", -0.8,
        r"\bguess|\bestimat|approximat|\bround(?:ed)? (?:the|your|it|to)|\broughly\b",
        "Make your best guess.",
    ),
    _phrase(
        "words", -0.7, r"\b(?:in|with|using) words\b|spell(?:ed)? (?:it )?out", "Write the answer in words."
    ),
    _phrase(
        "brief", -0.6,
        r"be brief|\bbriefly\b|skip (?:the )?(?:reasoning|steps|explanation)|"
        r"without (?:showing|explaining|explanation|working)|do(?:n't| not) (?:show|explain)|"
        r"no need to (?:show|explain)|as (?:short|brief) as possible|at a glance",
        "Be brief and skip the reasoning.",
    ),
    _phrase(
        "creative", -0.4, r"\bcreativ|imaginative|artistic|poetic|\bflair\b",
        "Be creative with your interpretation.",
    ),
    _phrase("rush", -0.3, r"\bquick(?:ly)?\b|\bfast\b|\bhurry|\bimmediately\b", "Answer quickly."),
    _phrase(
        "pressure", -0.2,
        r"high[- ]stakes|lives? (?:depend|are at stake)|your (?:job|career) depends|catastroph|"
        r"under (?:extreme )?pressure",
        "This is a high-stakes exam.",
    ),
)
"""Instruction phrases and their logit weights (the sum is clamped to ``PHRASE_CLAMP``)."""

OPTIMAL_INSTRUCTION = (
    "You are a meticulous math tutor. Identify every quantity in the problem, then think step by step, "
    "applying each operation in the order the story describes. Double-check the arithmetic and give the "
    "final answer as a single number."
)
"""An instruction that reaches the top of the phrase clamp."""


@lru_cache(maxsize=4096)
def instruction_effect(instruction: str) -> float:
    """The clamped logit contribution of an instruction's phrases."""
    total = sum(p.weight for p in PHRASES if p.pattern.search(instruction))
    return max(PHRASE_CLAMP[0], min(PHRASE_CLAMP[1], total))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --- proposer pools (every sentence is checked against PHRASES in the tests) ---------------

_HELPFUL = (
    "Think step by step, writing out each intermediate result.",
    "Work through the problem one operation at a time.",
    "Give the final answer as a single number with no units.",
    "End your response with only the final number.",
    "Double-check the arithmetic before answering.",
    "Verify each calculation against the numbers in the question.",
    "Identify every quantity mentioned in the problem before computing.",
    "Apply each operation in the order the story describes.",
)
_NEUTRAL = (
    "Read the problem carefully.",
    "Use the information given in the question.",
    "Pay attention to the wording of the problem.",
    "Answer the question that is asked.",
    "Be clear and precise in your response.",
    "Keep your response well organized.",
    "Consider the context of each problem.",
)
_HARMFUL = (
    "Make your best guess if the problem seems complicated.",
    "Be brief and skip the reasoning.",
    "Write the answer out in words.",
    "Estimate the result rather than computing it exactly.",
    "Answer quickly without showing any work.",
    "Feel free to be creative with your interpretation.",
)
_PERSONAS = (
    ("helpful", "You are a meticulous math tutor."),
    ("helpful", "You are a careful accountant who checks every figure."),
    ("neutral", "You are a helpful assistant."),
    ("neutral", "You are a friendly teaching assistant."),
    ("harmful", "You are a game show contestant who answers at a glance."),
)
_STAKES = (
    "This is a high-stakes exam: a wrong answer costs the student a scholarship.",
    "Accuracy matters here, lives depend on getting the numbers right.",
    "The result goes straight into a bank's ledger, so double-check every step.",
)
_CREATIVE = (
    "Feel free to be creative with your interpretation.",
    "Bring some imaginative flair to the explanation.",
    "Frame the problem as a small scene before solving it.",
)
_OPENINGS = (
    "{basic}",
    "{basic}",
    "Solve the arithmetic word problem.",
    "Read the word problem and answer it.",
    "Answer the math question below.",
)
_TIP_PATTERNS = (
    ("simple", re.compile(r"concise|\bsimple\b|\bshort\b|\bbrief", re.I)),
    ("description", re.compile(r"descriptive|informative|detailed", re.I)),
    ("creative", re.compile(r"creativ", re.I)),
    ("high_stakes", re.compile(r"high stakes|high-stakes", re.I)),
    ("persona", re.compile(r"persona|you are a", re.I)),
)
_TIP_LENGTH = {"none": (2, 3), "simple": (1, 2), "description": (3, 5), "creative": (2, 4),
               "persona": (2, 3), "high_stakes": (2, 3)}
_OBSERVATIONS = (
    "The examples are short arithmetic word problems about everyday things such as apples, tickets, "
    "pages and money.",
    "Each answer is a single whole number.",
    "A problem starts from one quantity and changes it one to three times; harder ones multiply or divide.",
    "Every question ends by asking for a final count or amount.",
    "The wording is simple, at about a grade-school reading level.",
    "Names and objects vary, but the structure of the problems is very regular.",
    "Several problems chain more than one step, so intermediate results matter.",
)
_PROGRAM_DESCRIPTIONS = (
    "The program solves arithmetic word problems: it reads the question, reasons about the quantities "
    "involved and returns a numeric answer.",
    "This program takes a short word problem about everyday items and returns the result of the "
    "arithmetic it describes.",
    "A chain-of-thought program: it first writes out its reasoning step by step, then gives the final "
    "answer.",
    "A language-model program that maps a math question to an answer, with intermediate reasoning.",
)
_MODULE_DESCRIPTIONS = (
    "This module reads the word problem and produces the numeric answer.",
    "The module carries out the arithmetic described in the question and reports the result.",
    "It is the step that turns the question into a final number, explaining its reasoning first.",
    "The module is responsible for computing the answer from the quantities in the question.",
)
_PROPOSER_FIELDS = {
    "proposed_instruction", "observations", "summary", "program_description", "module_description",
}
_TEXT_FIELDS = {"reasoning", "rationale", "plan", "explanation", "steps", "notes", "summary", "thoughts",
                "analysis", "critique", "feedback"}
_NOT_SUPPLIED = "Not supplied for this particular example."

# --- hashing -------------------------------------------------------------------------------


def _digest(*parts: object) -> bytes:
    return hashlib.blake2b("\x1f".join(map(str, parts)).encode("utf-8", "replace"), digest_size=16).digest()


def _unit(digest: bytes, offset: int = 0) -> float:
    """A uniform number in [0, 1) from 8 bytes of a digest."""
    return int.from_bytes(digest[offset: offset + 8], "big") / 2.0**64


def _temperature_key(temperature: float | None) -> str:
    return "none" if temperature is None else f"{float(temperature):.6g}"


# --- the math task -------------------------------------------------------------------------

_LAST_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_PLAN_OP = re.compile(r"\b(add|subtract|multiply by|divide by) (\d+)", re.IGNORECASE)


def _last_int(text: str) -> int | None:
    found = _LAST_NUMBER.findall(text)
    if not found:
        return None
    try:
        value = float(found[-1].replace(",", ""))
    except ValueError:
        return None
    return int(value) if value.is_integer() else None


def _target_field(outputs: Sequence[_Field]) -> _Field | None:
    names = [f.name for f in outputs]
    if "answer" in names:
        return outputs[names.index("answer")]
    for field in outputs:
        if "answer" in field.name:
            return field
    if outputs and outputs[-1].name not in _TEXT_FIELDS and outputs[-1].name not in _PROPOSER_FIELDS:
        return outputs[-1]
    return None


@lru_cache(maxsize=16384)
def _demo_effect(question: str, answer: str, reasoning: str) -> float:
    truth = _math.solve(question)
    given = _last_int(answer)
    if truth is None or given is None:
        return 0.0
    if given != truth:
        return DEMO_WRONG
    reasoned = bool(reasoning.strip()) and not reasoning.strip().startswith(_NOT_SUPPLIED)
    return DEMO_REASONED if reasoned else DEMO_LABELED


def _demos_effect(prompt: _Prompt, target: str) -> float:
    gains: list[float] = []
    losses = 0.0
    for inputs, outputs in prompt.demos:
        question = next((v for v in inputs.values() if _math.parse(v) is not None), None)
        if question is None or target not in outputs:
            continue
        reasoning = outputs.get("reasoning", outputs.get("rationale", ""))
        effect = _demo_effect(question, outputs[target], reasoning)
        if effect > 0:
            gains.append(effect)
        else:
            losses += effect
    gains.sort(reverse=True)
    return losses + sum(g * w for g, w in zip(gains, DEMO_DECAY, strict=False))


def _plan_effect(prompt: _Prompt, problem: _math.Problem) -> float:
    for name, value in prompt.inputs.items():
        if "plan" not in name:
            continue
        found = [(op.lower(), int(n)) for op, n in _PLAN_OP.findall(value)]
        if not found:
            return 0.0
        wanted = [(_PLAN_WORDS[op], n) for op, n in problem.ops]
        return PLAN_MATCH if found == wanted else PLAN_MISMATCH
    return 0.0


_PLAN_WORDS = {"add": "add", "sub": "subtract", "mul": "multiply by", "div": "divide by"}
_FLIP = {"add": "subtract", "subtract": "add", "multiply by": "divide by", "divide by": "multiply by"}


def _math_logit(prompt: _Prompt, problem: _math.Problem, target: _Field | None) -> float:
    names = [f.name for f in prompt.system.outputs]
    logit = BASE_LOGIT + instruction_effect(prompt.system.instruction)
    if target is not None:
        before = names[: names.index(target.name)]
        if "reasoning" in before or "rationale" in before:
            logit += REASONING_BONUS
        logit += _demos_effect(prompt, target.name)
    logit += _plan_effect(prompt, problem)
    return logit - DIFFICULTY_PENALTY[max(1, min(3, len(problem.ops)))]


def _mistake(problem: _math.Problem, digest: bytes) -> tuple[int, list[str]]:
    """A nearby wrong answer and reasoning that leads to it: a slip, a skipped or a swapped step."""
    truth = problem.answer
    kind = digest[8] % 4
    delta = (1, 2, 3, 4, 5, 10)[digest[9] % 6]
    head = _math.Problem(problem.start, problem.ops[:-1], problem.unit)
    if kind == 2 and len(problem.ops) > 1 and head.answer != truth:
        return head.answer, _math.steps(head) or []
    op, n = problem.ops[-1]
    swapped = {"add": "sub", "sub": "add", "mul": "add", "div": "sub"}[op]
    mistaken = _math.Problem(problem.start, (*problem.ops[:-1], (swapped, n)), problem.unit)
    if kind == 3 and mistaken.answer not in (truth,) and mistaken.answer >= 0:
        return mistaken.answer, _math.steps(mistaken) or []
    wrong = truth - delta if kind == 1 and truth - delta >= 0 else truth + delta
    return wrong, _math.steps(problem, final=wrong) or []


def _math_values(prompt: _Prompt, problem: _math.Problem, question: str, seed: int,
                 temperature: float | None) -> dict[str, Any]:
    target = _target_field(prompt.system.outputs)
    logit = _math_logit(prompt, problem, target)
    demo_key = json.dumps(prompt.demos, sort_keys=True)
    draw = _digest("math", prompt.system.instruction, demo_key, question, _temperature_key(temperature), seed)
    shared = _unit(_digest("hardness", question, seed))
    u = shared if _unit(draw, 8) < QUESTION_SHARE else _unit(draw)
    correct = u < _sigmoid(logit)
    value, lines = (problem.answer, _math.steps(problem) or []) if correct else _mistake(problem, draw)
    values: dict[str, Any] = {}
    for field in prompt.system.outputs:
        if target is not None and field.name == target.name:
            values[field.name] = value if target.type in ("int", "float") else str(value)
        elif "plan" in field.name or "step" in field.name:
            values[field.name] = _plan_text(problem, correct, draw)
        elif field.name in _TEXT_FIELDS:
            values[field.name] = " ".join([*lines, f"So the answer is {value}."])
        else:
            values[field.name] = _filler(field, draw)
    return values


def _plan_text(problem: _math.Problem, correct: bool, digest: bytes) -> str:
    ops = [(_PLAN_WORDS[op], n) for op, n in problem.ops]
    if not correct:
        index = digest[10] % len(ops)
        ops[index] = (_FLIP[ops[index][0]], ops[index][1])
    lines = [f"1. Start from the {problem.start} {problem.unit}."]
    lines += [f"{i}. {op.capitalize()} {n}." for i, (op, n) in enumerate(ops, start=2)]
    lines.append(f"{len(ops) + 2}. Report the final number of {problem.unit}.")
    return "\n".join(lines)


# --- proposer fields -----------------------------------------------------------------------


def _tip_kind(inputs: dict[str, str]) -> str:
    tip = " ".join(value for name, value in inputs.items() if "tip" in name)
    for kind, pattern in _TIP_PATTERNS:
        if pattern.search(tip):
            return kind
    return "none"


def _proposed_instruction(prompt: _Prompt, rng: random.Random) -> str:
    inputs = prompt.inputs
    kind = _tip_kind(inputs)
    helpful, harmful = 0.45, 0.20
    demos = inputs.get("task_demos", "")
    if demos and "No task demos provided" not in demos:
        helpful, harmful = helpful + 0.10, harmful - 0.05
    if re.search(r"arithmetic|math|number", inputs.get("dataset_description", ""), re.I):
        helpful += 0.05
    if kind == "creative":
        harmful += 0.15
    basic = inputs.get("basic_instruction", "").strip() or "Solve the arithmetic word problem."
    if len(basic) > 200 or instruction_effect(basic) != 0:
        basic = "Solve the arithmetic word problem."
    sentences = [rng.choice(_OPENINGS).format(basic=basic)]
    if kind == "persona":
        sentences.insert(0, rng.choice(_PERSONAS)[1])
    pools = {"helpful": list(_HELPFUL), "neutral": list(_NEUTRAL), "harmful": list(_HARMFUL)}
    low, high = _TIP_LENGTH[kind]
    for _ in range(rng.randint(low, high)):
        roll = rng.random()
        category = "helpful" if roll < helpful else "harmful" if roll < helpful + harmful else "neutral"
        pool = pools[category] or pools["neutral"]
        sentences.append(pool.pop(rng.randrange(len(pool))))
    if kind == "creative" and rng.random() < 0.6:
        sentences.append(rng.choice(_CREATIVE))
    if kind == "high_stakes":
        sentences.append(rng.choice(_STAKES))
    return " ".join(dict.fromkeys(sentences))


def _proposer_value(field: str, prompt: _Prompt, rng: random.Random) -> str:
    if field == "proposed_instruction":
        return _proposed_instruction(prompt, rng)
    if field == "observations":
        if "prior_observations" in prompt.inputs and rng.random() < COMPLETE_RATE:
            return "COMPLETE"
        return " ".join(rng.sample(_OBSERVATIONS, rng.randint(2, 4)))
    if field == "summary":
        return " ".join(rng.sample(_OBSERVATIONS, rng.randint(2, 3)))
    if field == "program_description":
        return rng.choice(_PROGRAM_DESCRIPTIONS)
    return rng.choice(_MODULE_DESCRIPTIONS)


# --- the surface as data -------------------------------------------------------------------


def describe(task: str = "math") -> dict[str, Any]:
    """The response surface of ``task`` as data: weights, effects and where the optimum is."""
    if task not in TASKS:
        raise ConfigError(f"unknown simulator task {task!r}; expected one of {', '.join(TASKS)}")
    demo_max = sum(DEMO_REASONED * w for w in DEMO_DECAY)
    best_gain = instruction_effect(OPTIMAL_INSTRUCTION)

    def accuracy(gain: float) -> dict[int, float]:
        return {level: round(_sigmoid(BASE_LOGIT + REASONING_BONUS + gain - penalty), 3)
                for level, penalty in DIFFICULTY_PENALTY.items()}

    return {
        "task": task,
        "model": "p(correct) = sigmoid(logit); the answer field holds the true number with probability p, "
                 "otherwise a nearby wrong integer",
        "base_logit": BASE_LOGIT,
        "reasoning_bonus": REASONING_BONUS,
        "difficulty_penalty": dict(DIFFICULTY_PENALTY),
        "phrases": [{"name": p.name, "weight": p.weight, "pattern": p.pattern.pattern, "example": p.example}
                    for p in PHRASES],
        "phrase_clamp": list(PHRASE_CLAMP),
        "demos": {"correct_with_reasoning": DEMO_REASONED, "correct_labeled": DEMO_LABELED,
                  "wrong": DEMO_WRONG, "decay": list(DEMO_DECAY), "max_gain": round(demo_max, 3)},
        "plan": {"matching": PLAN_MATCH, "contradicting": PLAN_MISMATCH},
        "question_share": QUESTION_SHARE,
        "baseline": {"instruction": "DSPy's default (no phrases), no demos, with a reasoning field",
                     "expected_accuracy": accuracy(0.0)},
        "optimum": {"instruction": OPTIMAL_INSTRUCTION, "instruction_gain": best_gain,
                    "demos": "four demos with correct answers and reasoning", "demo_gain": round(demo_max, 3),
                    "expected_accuracy": accuracy(best_gain + demo_max)},
        "proposer": {"helpful": list(_HELPFUL), "neutral": list(_NEUTRAL), "harmful": list(_HARMFUL),
                     "tip_lengths": {k: list(v) for k, v in _TIP_LENGTH.items()},
                     "complete_rate": COMPLETE_RATE},
        "determinism": "a pure function of (prompt, temperature, seed); rollout_id never reaches the engine",
    }
