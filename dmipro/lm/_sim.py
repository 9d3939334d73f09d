"""SimLM: an offline, deterministic language model for DSPy programs.

:class:`SimEngine` is a DSPy 3.4 engine (``complete(Request) -> Response``); :func:`sim_lm`
wraps it in a ``dspy.LM`` (``sim_lm("sim/math")``). It reads the messages DSPy's
ChatAdapter, JSONAdapter and XMLAdapter send — output fields and their types from the
system message, the instruction after "your objective is:", few-shot demos as earlier
user/assistant pairs, the inputs in the last user message — and answers in the format of
the adapter that asked.

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
field gets plausible filler of its declared type (str, int, float, bool, lists, dicts,
Literal choices, pydantic models via the JSON schema the adapter shows). A prompt that no
adapter wrote (``lm("...")``) gets a prose reply.

Latency (fixed or lognormal), rate limits (``dspy.lm15.RateLimitError`` with
``retry_after``), server errors, timeouts and malformed replies are injected per
:data:`SIM_OPTIONS`; DSPy's LM layer retries the first three as it would a provider's.
``dmipro.lm.server`` serves the same engine as an OpenAI-compatible HTTP API.

Determinism
-----------
Every answer is a pure function of the prompt, the temperature and ``seed``. The math
draw hashes (instruction, demos, question, temperature, seed); with probability 0.5 it is
replaced by a per-question "hardness" number that every prompt shares, so two prompts
disagree less often than independent coins would. DSPy 3.4 strips ``rollout_id`` before a
request reaches an engine, so rollouts of the same prompt at the same temperature return
the same text. Injected failures hash the prompt, the seed and how many times this engine
has seen that prompt, so a retry can succeed while a fresh engine replays the same
sequence. A failure never changes what a later successful attempt answers.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import re
import statistics
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import dspy
from dspy.lm15 import (
    Message,
    RateLimitError,
    Request,
    Response,
    ServerError,
    TextPart,
    Usage,
    response_to_events,
)
from dspy.lm15 import TimeoutError as LMTimeoutError

from dmipro.errors import ConfigError
from dmipro.lm import _math

__all__ = [
    "OPTIMAL_INSTRUCTION",
    "PHRASES",
    "SIM_OPTIONS",
    "TASKS",
    "AsyncSimEngine",
    "Phrase",
    "SimEngine",
    "SimReply",
    "describe",
    "instruction_effect",
    "sim_lm",
]

TASKS = ("math",)
"""Tasks the simulator knows; the model string ``sim/<task>`` picks one."""

SIM_OPTIONS = frozenset(
    {
        "task", "latency_ms", "latency_dist", "latency_sigma", "rate_limit_rate", "retry_after_s",
        "server_error_rate", "timeout_rate", "malformed_rate", "seed",
    }
)
"""Option names :class:`SimEngine` accepts (a job spec's ``sim:`` block is checked against it)."""

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
_FILLER = (
    "The question describes a short everyday situation.",
    "This follows from the information given.",
    "The relevant details are in the question.",
    "A brief note on the input.",
)
_PROPOSER_FIELDS = {
    "proposed_instruction", "observations", "summary", "program_description", "module_description",
}
_TEXT_FIELDS = {"reasoning", "rationale", "plan", "explanation", "steps", "notes", "summary", "thoughts",
                "analysis", "critique", "feedback"}
_NOT_SUPPLIED = "Not supplied for this particular example."

# --- reading the prompt --------------------------------------------------------------------

_OUTPUTS_HEADER = "Your output fields are:"
_STRUCTURE_HEADER = "All interactions will be structured"
_OBJECTIVE = re.compile(r"your objective is:[ \t]*\n?")
_FIELD_LINE = re.compile(r"^\d+\. `(\w+)` \((.+?)\)(?::|$)", re.MULTILINE)
_CHAT_HEADER = re.compile(r"^\[\[ ## (\w+) ## \]\][ \t]*$", re.MULTILINE)
_XML_FIELD = re.compile(r"<(\w+)>\n?(.*?)\n?</\1>", re.DOTALL)
_TRAILER = re.compile(r"\n*Respond with (?:the corresponding output fields|a JSON object).*\Z", re.DOTALL)
_NOTE = re.compile(r"note: the value you produce (.*)$")
_SCHEMA_NOTE = re.compile(r"adhere to the JSON schema: (\{.*\})\s*$")
_ONE_OF = re.compile(r"one of: (.*)$")
_QUOTED = re.compile(r"'([^']*)'|\"([^\"]*)\"")
_LAST_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_PLAN_OP = re.compile(r"\b(add|subtract|multiply by|divide by) (\d+)", re.IGNORECASE)


@dataclass(frozen=True)
class _Field:
    name: str
    type: str
    choices: tuple[str, ...] = ()
    schema: str | None = None
    skeleton: str | None = None  # XMLAdapter's nested-structure hint, e.g. <item><qty>...</qty></item>


class _Raw(str):
    """Text rendered verbatim (an XML subtree)."""

    __slots__ = ()


@dataclass(frozen=True)
class _System:
    instruction: str
    inputs: frozenset[str]
    outputs: tuple[_Field, ...]
    fmt: str  # "chat" | "json" | "xml"


@lru_cache(maxsize=512)
def _read_system(system: str) -> _System:
    """Fields, format and instruction of a DSPy adapter's system message (cached: it repeats)."""
    head, _, tail = system.partition(_STRUCTURE_HEADER)
    inputs_part, _, outputs_part = head.partition(_OUTPUTS_HEADER)
    inputs = frozenset(m.group(1) for m in _FIELD_LINE.finditer(inputs_part))
    objective = _OBJECTIVE.search(tail)
    if objective is not None:
        instruction = "\n".join(line.strip() for line in tail[objective.end():].splitlines()).strip()
        structure = tail[: objective.start()]
    else:
        instruction, structure = (system.strip(), "") if not tail else (tail.strip(), tail)
    notes = _field_notes(structure)
    outputs = []
    for match in _FIELD_LINE.finditer(outputs_part):
        name, type_ = match.group(1), match.group(2).strip()
        note = notes.get(name, "")
        choices: tuple[str, ...] = ()
        if type_.startswith("Literal["):
            choices = tuple(a or b for a, b in _QUOTED.findall(type_))
        elif (one_of := _ONE_OF.search(note)) is not None:
            choices = tuple(c.strip() for c in one_of.group(1).split(";"))
        schema = _SCHEMA_NOTE.search(note)
        skeleton = re.search(rf"^<{name}><.*</{name}>$", structure, re.MULTILINE)
        outputs.append(_Field(name, type_, choices, schema.group(1) if schema else None,
                              skeleton.group(0) if skeleton else None))
    if "Outputs will be a JSON object" in structure:
        fmt = "json"
    elif "[[ ## completed ## ]]" in structure or not structure:
        fmt = "chat"
    else:
        fmt = "xml"
    return _System(instruction, inputs, tuple(outputs), fmt)


def _field_notes(structure: str) -> dict[str, str]:
    """``{field: note}`` from the "# note: the value you produce ..." hints of either adapter."""
    notes: dict[str, str] = {}
    if "Outputs will be a JSON object" in structure:
        block = structure[structure.find("{", structure.index("Outputs will be a JSON object")):]
        try:
            template = json.JSONDecoder().raw_decode(block)[0]
        except ValueError:
            template = {}
        items = template.items() if isinstance(template, dict) else ()
        lines = [f"{{{k}}} {v}" for k, v in items if isinstance(v, str)]
    else:
        lines = structure.splitlines()
    for line in lines:
        if line.startswith("{") and "# note:" in line:
            name = line[1: line.index("}")]
            note = _NOTE.search(line)
            if note is not None:
                notes[name] = note.group(1)
    return notes


def _sections(text: str, fmt: str, known: frozenset[str] | None = None) -> dict[str, str]:
    """Field values of one rendered message (inputs are always ``[[ ## name ## ]]`` except in XML)."""
    if fmt == "json" and text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if isinstance(data, dict):
            return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in data.items()}
    if fmt == "xml":
        return {m.group(1): m.group(2).strip() for m in _XML_FIELD.finditer(text)}
    text = _TRAILER.sub("", text)
    parts = _CHAT_HEADER.split(text)
    values: dict[str, str] = {}
    current: str | None = None
    for index, part in enumerate(parts):
        if index % 2 == 1 and (known is None or part in known or part == "completed"):
            current = part
            values.setdefault(current, "")
        elif current is not None:
            joined = part if index % 2 == 0 else f"[[ ## {part} ## ]]"
            values[current] = values[current] + joined
    values.pop("completed", None)
    return {k: v.strip() for k, v in values.items()}


@dataclass(frozen=True)
class _Prompt:
    system: _System
    demos: tuple[tuple[dict[str, str], dict[str, str]], ...]
    inputs: dict[str, str]
    text: str  # everything the model was shown, for hashing


_PLAIN_OUTPUTS = (_Field("reasoning", "str"), _Field("answer", "str"))


def _read_prompt(system: str, messages: Sequence[tuple[str, str]]) -> _Prompt:
    info = _read_system(system)
    turns = [(role, text) for role, text in messages if role in ("user", "assistant", "developer")]
    text = "\x1e".join([system, *(f"{role}:{text}" for role, text in messages)])
    if not info.outputs:
        # Not an adapter's prompt (``lm("...")``): reply in prose to the last user turn.
        plain = _System(info.instruction, frozenset({"question"}), _PLAIN_OUTPUTS, "plain")
        return _Prompt(plain, (), {"question": turns[-1][1] if turns else ""}, text)
    fmt = info.fmt
    if turns and fmt == "chat" and "wrapped in XML tags" in turns[-1][1]:
        fmt = "xml"
        info = _System(info.instruction, info.inputs, info.outputs, fmt)
    known = info.inputs | {f.name for f in info.outputs}
    demos = []
    input_fmt = "xml" if fmt == "xml" else "chat"
    for (role, text), (next_role, answer) in zip(turns[:-1], turns[1:-1], strict=False):
        if role == "user" and next_role == "assistant":
            demos.append((_sections(text, input_fmt, known), _sections(answer, fmt, known)))
    last = turns[-1][1] if turns else ""
    inputs = _sections(last, input_fmt, known)
    return _Prompt(info, tuple(demos), inputs, text)


# --- hashing -------------------------------------------------------------------------------


def _digest(*parts: object) -> bytes:
    return hashlib.blake2b("\x1f".join(map(str, parts)).encode("utf-8", "replace"), digest_size=16).digest()


def _unit(digest: bytes, offset: int = 0) -> float:
    """A uniform number in [0, 1) from 8 bytes of a digest."""
    return int.from_bytes(digest[offset: offset + 8], "big") / 2.0**64


def _temperature_key(temperature: float | None) -> str:
    return "none" if temperature is None else f"{float(temperature):.6g}"


# --- the math task -------------------------------------------------------------------------


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


# --- filler of any declared type -----------------------------------------------------------


def _filler(field: _Field, digest: bytes) -> Any:
    pick = digest[11]
    if field.choices:
        return field.choices[pick % len(field.choices)]
    if field.skeleton is not None and not _is_builtin_type(field.type):
        # Leaves of "1" validate as strings and as numbers alike.
        return _Raw(field.skeleton.replace("...", "1"))
    if field.schema is not None:
        try:
            schema = json.loads(field.schema)
        except ValueError:
            schema = {}
        return _from_schema(schema, schema.get("$defs", {}), pick, 0)
    return _from_type(field.type.replace(" ", ""), pick, 0)


_BUILTIN_TYPES = {"list", "dict", "int", "float", "bool", "str", "Literal", "Optional", "None", "Any"}


def _is_builtin_type(type_: str) -> bool:
    names = re.findall(r"[A-Za-z_]\w*", _QUOTED.sub("", type_))
    return all(name in _BUILTIN_TYPES for name in names)


def _from_type(type_: str, pick: int, depth: int) -> Any:
    """A value for a rendered type name such as ``int``, ``list[str]`` or ``dict[str, int]``."""
    if type_.endswith("|None"):
        type_ = type_[: -len("|None")]
    if type_.startswith("Optional[") and type_.endswith("]"):
        type_ = type_[len("Optional["): -1]
    if type_ == "int":
        return pick % 10 + 1
    if type_ == "float":
        return round((pick % 100) / 100, 2)
    if type_ == "bool":
        return pick % 2 == 0
    if type_.startswith("Literal["):
        choices = [a or b for a, b in _QUOTED.findall(type_)]
        return choices[pick % len(choices)] if choices else _FILLER[0]
    if depth < 4 and type_.startswith("list[") and type_.endswith("]"):
        return [_from_type(type_[5:-1], pick + i, depth + 1) for i in range(2)]
    if type_.startswith("list"):
        return ["first item", "second item"]
    if depth < 4 and type_.startswith("dict[") and type_.endswith("]"):
        inner = type_[5:-1]
        value_type = inner.split(",", 1)[1] if "," in inner else "str"
        return {"key": _from_type(value_type, pick, depth + 1)}
    if type_.startswith("dict"):
        return {"note": "value"}
    return _FILLER[pick % len(_FILLER)]


def _from_schema(schema: dict[str, Any], defs: dict[str, Any], pick: int, depth: int) -> Any:
    if depth > 6:
        return None
    if "$ref" in schema:
        return _from_schema(defs.get(schema["$ref"].rsplit("/", 1)[-1], {}), defs, pick, depth + 1)
    if "enum" in schema and schema["enum"]:
        return schema["enum"][pick % len(schema["enum"])]
    if "const" in schema:
        return schema["const"]
    for key in ("anyOf", "oneOf", "allOf"):
        options = [s for s in schema.get(key, []) if s.get("type") != "null"]
        if options:
            return _from_schema(options[0], defs, pick, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind == "object":
        properties = schema.get("properties")
        if properties:
            return {
                k: _from_schema(v, defs, pick + i, depth + 1) for i, (k, v) in enumerate(properties.items())
            }
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            return {"key": _from_schema(extra, defs, pick, depth + 1)}
        return {"note": "value"}
    if kind == "array":
        items = schema.get("items", {"type": "string"})
        return [_from_schema(items, defs, pick + i, depth + 1) for i in range(2)]
    if kind == "integer":
        return pick % 10 + 1
    if kind == "number":
        return round((pick % 100) / 100, 2)
    if kind == "boolean":
        return pick % 2 == 0
    return _FILLER[pick % len(_FILLER)]


# --- rendering -----------------------------------------------------------------------------


def _render(values: dict[str, Any], fmt: str) -> str:
    if fmt == "plain":
        return str(values.get("reasoning") or values.get("answer", ""))
    if fmt == "json":
        return json.dumps(values, indent=2)
    blocks: list[str] = []
    for name, value in values.items():
        nested = isinstance(value, (list, dict))
        text = value if isinstance(value, str) else json.dumps(value) if nested else str(value)
        if fmt == "xml" and isinstance(value, _Raw):
            blocks.append(value)
        elif fmt == "xml":
            blocks.append(_xml(value, name) if nested else f"<{name}>\n{_escape(text)}\n</{name}>")
        else:
            blocks.append(f"[[ ## {name} ## ]]\n{text}")
    if fmt == "chat":
        blocks.append("[[ ## completed ## ]]")
    return "\n\n".join(blocks)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _xml(value: Any, tag: str) -> str:
    """Nested XML as DSPy's XMLAdapter reads it: list items are ``<item>``, dict keys are tags."""
    if isinstance(value, list):
        return f"<{tag}>{''.join(_xml(item, 'item') for item in value)}</{tag}>"
    if isinstance(value, dict):
        return f"<{tag}>{''.join(_xml(v, str(k)) for k, v in value.items())}</{tag}>"
    return f"<{tag}>{_escape(str(value))}</{tag}>"


def _malformed(values: dict[str, Any], fmt: str, digest: bytes) -> str:
    """An unusable reply: a refusal, a cut-off reply, or one with the last field missing."""
    kind = digest[12] % 3
    if kind == 0 or not values:
        return "I'm sorry, but I can't help with that request."
    text = _render(values, fmt)
    if kind == 1:
        return text[: max(1, len(text) // 2)]
    kept = dict(list(values.items())[:-1])
    return _render(kept, fmt).replace("[[ ## completed ## ]]", "").strip() or "..."


# --- the engine ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SimReply:
    """One simulated completion: the text and its approximate token counts."""

    text: str
    input_tokens: int
    output_tokens: int
    finish_reason: str = "stop"


def _tokens(chars: int) -> int:
    # About four characters per token, as in common BPE vocabularies on English text.
    return max(1, (chars + 3) // 4)


class SimEngine:
    """A simulated LM behind DSPy's engine contract (``complete``, ``stream``, ``close``).

    Deterministic in (prompt, temperature, ``seed``); see the module docstring for the
    response surface. Thread-safe: the only mutable state is the per-prompt attempt
    counter used by error injection, guarded by a lock. The engine holds no connection,
    so ``close()`` does nothing and one engine may serve many ``dspy.LM`` copies.
    """

    def __init__(
        self,
        task: str = "math",
        *,
        latency_ms: float = 0.0,
        latency_dist: str = "fixed",
        latency_sigma: float = 0.5,
        rate_limit_rate: float = 0.0,
        retry_after_s: float = 1.0,
        server_error_rate: float = 0.0,
        timeout_rate: float = 0.0,
        malformed_rate: float = 0.0,
        seed: int = 0,
    ) -> None:
        if task not in TASKS:
            raise ConfigError(f"unknown simulator task {task!r}; expected one of {', '.join(TASKS)}")
        if latency_dist not in ("fixed", "lognormal"):
            raise ConfigError(f"latency_dist must be 'fixed' or 'lognormal', not {latency_dist!r}")
        for name, rate in (("rate_limit_rate", rate_limit_rate), ("server_error_rate", server_error_rate),
                           ("timeout_rate", timeout_rate), ("malformed_rate", malformed_rate)):
            if not 0.0 <= rate <= 1.0:
                raise ConfigError(f"{name} must be between 0 and 1, not {rate!r}")
        for name, value in (("latency_ms", latency_ms), ("latency_sigma", latency_sigma),
                            ("retry_after_s", retry_after_s)):
            if value < 0:
                raise ConfigError(f"{name} must be >= 0, not {value!r}")
        self.task = task
        self.latency_ms = float(latency_ms)
        self.latency_dist = latency_dist
        self.latency_sigma = float(latency_sigma)
        self.rate_limit_rate = float(rate_limit_rate)
        self.retry_after_s = float(retry_after_s)
        self.server_error_rate = float(server_error_rate)
        self.timeout_rate = float(timeout_rate)
        self.malformed_rate = float(malformed_rate)
        self.seed = int(seed)
        self._attempts: dict[bytes, int] = {}
        self._lock = threading.Lock()

    @property
    def options(self) -> dict[str, Any]:
        """The constructor options, as a JSON-ready dict."""
        return {name: getattr(self, name) for name in sorted(SIM_OPTIONS)}

    def dump_state(self) -> dict[str, Any]:
        """State for ``dspy.LM.dump_state`` (a saved program records its LM this way)."""
        return self.options

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> SimEngine:
        """Rebuild an engine from :meth:`dump_state`."""
        return cls(**state)

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.options.items() if v != _DEFAULTS.get(k)}
        return f"SimEngine({', '.join(f'{k}={v!r}' for k, v in changed.items())})"

    # DSPy's engine contract -------------------------------------------------------------

    def complete(self, request: Request) -> Response:
        """Answer one canonical request; raises ``dspy.lm15`` errors when a failure is injected."""
        system = request.system if isinstance(request.system, str) else "".join(
            getattr(part, "text", "") for part in request.system or ()
        )
        messages = [
            (m.role, "".join(p.text for p in m.parts if isinstance(p, TextPart))) for m in request.messages
        ]
        reply = self.respond(system, messages, temperature=request.config.temperature)
        return Response(
            id=None,
            model=request.model,
            message=Message.assistant([TextPart(reply.text)]),
            finish_reason="stop",
            usage=Usage(input_tokens=reply.input_tokens, output_tokens=reply.output_tokens),
        )

    def stream(self, request: Request) -> Iterator[Any]:
        """The completion as canonical stream events (one delta)."""
        return iter(response_to_events(self.complete(request)))

    def close(self) -> None:
        """Nothing to release."""

    # The simulator itself, shared with the HTTP server --------------------------------------

    def respond(self, system: str, messages: Sequence[tuple[str, str]], *,
                temperature: float | None = None) -> SimReply:
        """Simulate one completion of ``(system, [(role, text), ...])`` at ``temperature``.

        Sleeps for the configured latency, then raises ``dspy.lm15.RateLimitError`` (with
        ``retry_after``), ``ServerError`` or ``TimeoutError`` when a failure is injected.
        """
        prompt = _read_prompt(system, messages)
        key = _digest(prompt.text, _temperature_key(temperature), self.seed)
        failures = self.rate_limit_rate or self.server_error_rate or self.timeout_rate or self.malformed_rate
        attempt = self._attempt(key) if failures else 0
        self._sleep(key, attempt)
        chance = _digest(key.hex(), attempt, "failures")
        if self.rate_limit_rate and _unit(chance) < self.rate_limit_rate:
            raise RateLimitError("simulated rate limit (429)", status=429, provider="sim",
                                 retry_after=self.retry_after_s)
        if self.server_error_rate and _unit(chance, 8) < self.server_error_rate:
            raise ServerError("simulated server error (500)", status=500, provider="sim")
        failure = _digest(key.hex(), attempt, "more")
        if self.timeout_rate and _unit(failure) < self.timeout_rate:
            raise LMTimeoutError("simulated request timeout", status=504, provider="sim")
        values = self._values(prompt, key, temperature)
        fmt = prompt.system.fmt
        if self.malformed_rate and _unit(failure, 8) < self.malformed_rate:
            text = _malformed(values, fmt, failure)
        else:
            text = _render(values, fmt)
        return SimReply(text, _tokens(len(prompt.text)), _tokens(len(text)))

    def _values(self, prompt: _Prompt, key: bytes, temperature: float | None) -> dict[str, Any]:
        outputs = prompt.system.outputs
        names = {f.name for f in outputs}
        if names & _PROPOSER_FIELDS:
            rng = random.Random(int.from_bytes(key, "big"))
            return {
                f.name: _proposer_value(f.name, prompt, rng) if f.name in _PROPOSER_FIELDS
                else _filler(f, key)
                for f in outputs
            }
        for value in prompt.inputs.values():
            problem = _math.parse(value)
            if problem is not None:
                return _math_values(prompt, problem, value, self.seed, temperature)
        return {f.name: _filler(f, key) for f in outputs}

    def _attempt(self, key: bytes) -> int:
        with self._lock:
            count = self._attempts.get(key, 0)
            self._attempts[key] = count + 1
            if len(self._attempts) > _MAX_TRACKED:
                # Retries follow their first attempt closely; forget the oldest prompts.
                del self._attempts[next(iter(self._attempts))]
        return count

    def _sleep(self, key: bytes, attempt: int) -> None:
        if self.latency_ms > 0:
            time.sleep(self._latency(key, attempt))

    def _latency(self, key: bytes, attempt: int) -> float:
        """Seconds to wait for one attempt: ``latency_ms``, or a lognormal draw with that median."""
        seconds = self.latency_ms / 1000.0
        if self.latency_dist == "lognormal":
            u = min(max(_unit(_digest(key.hex(), attempt, "latency")), 1e-9), 1 - 1e-9)
            seconds *= math.exp(self.latency_sigma * _NORMAL.inv_cdf(u))
        return seconds


_NORMAL = statistics.NormalDist()
_MAX_TRACKED = 100_000
_DEFAULTS: dict[str, Any] = {
    "task": "math", "latency_ms": 0.0, "latency_dist": "fixed", "latency_sigma": 0.5, "rate_limit_rate": 0.0,
    "retry_after_s": 1.0, "server_error_rate": 0.0, "timeout_rate": 0.0, "malformed_rate": 0.0, "seed": 0,
}


class AsyncSimEngine:
    """The async counterpart DSPy uses for ``acall``: runs :class:`SimEngine` in a worker thread."""

    def __init__(self, sync: SimEngine) -> None:
        self.sync = sync

    async def complete(self, request: Request) -> Response:
        """Answer one request without blocking the event loop."""
        return await asyncio.to_thread(self.sync.complete, request)

    async def stream(self, request: Request) -> Any:
        """The completion as canonical stream events."""
        for event in response_to_events(await self.complete(request)):
            yield event

    async def aclose(self) -> None:
        """Nothing to release."""

    def dump_state(self) -> dict[str, Any]:
        """State for ``dspy.LM.dump_state``."""
        return self.sync.dump_state()

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> AsyncSimEngine:
        """Rebuild from :meth:`dump_state`."""
        return cls(SimEngine.load_state(state))


def _task_of(model: str) -> str:
    provider, _, task = model.partition("/")
    if provider != "sim" or not task:
        raise ConfigError(f"a simulated model is named 'sim/<task>', e.g. 'sim/math', not {model!r}")
    return task


def sim_lm(model: str = "sim/math", **options: Any) -> dspy.LM:
    """A ``dspy.LM`` backed by :class:`SimEngine`; the task is the part after ``sim/``.

    Options in :data:`SIM_OPTIONS` configure the engine; the rest (``temperature``,
    ``max_tokens``, ``num_retries``, ``cache``...) go to ``dspy.LM``. The response cache is
    off unless ``cache=True`` is passed.
    """
    engine_options = {k: v for k, v in options.items() if k in SIM_OPTIONS}
    lm_options = {k: v for k, v in options.items() if k not in SIM_OPTIONS}
    task = engine_options.pop("task", None) or _task_of(model)
    if task != _task_of(model):
        raise ConfigError(f"model {model!r} names task {_task_of(model)!r} but task={task!r} was given")
    engine = SimEngine(task, **engine_options)
    lm_options.setdefault("cache", False)
    return dspy.LM(model, engine=engine, async_engine=AsyncSimEngine(engine), **lm_options)


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
