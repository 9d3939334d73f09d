"""Arithmetic word problems: a seeded generator and the parser that solves them.

Every problem is a short story: a first sentence states a starting quantity, each
following sentence applies one operation to it, and a final question asks for the
result. Wording varies across several settings (apples, tickets, pages, money,
marbles, cookies, stickers), but every sentence uses a fixed vocabulary of cue words,
so :func:`solve` can recover the operations with a few regular expressions.

Levels:

* 1 — one addition or subtraction;
* 2 — two additions/subtractions;
* 3 — three operations, at least one a multiplication or an exact division.

Every intermediate value is a positive integer.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import TypedDict

__all__ = ["Problem", "ProblemRecord", "difficulty", "generate_problems", "parse", "solve", "steps"]

Op = tuple[str, int]
"""One operation: (``"add"`` | ``"sub"`` | ``"mul"`` | ``"div"``, operand)."""


class ProblemRecord(TypedDict):
    """One dataset record: the question, its integer answer as a string, and its level."""

    question: str
    answer: str
    level: int


@dataclass(frozen=True)
class Problem:
    """A parsed word problem: the starting quantity and the operations applied to it."""

    start: int
    ops: tuple[Op, ...]
    unit: str

    @property
    def answer(self) -> int:
        """The true result of applying every operation in order."""
        value = self.start
        for op, n in self.ops:
            value = _apply(value, op, n)
        return value


def _apply(value: int, op: str, n: int) -> int:
    if op == "add":
        return value + n
    if op == "sub":
        return value - n
    if op == "mul":
        return value * n
    return value // n


# --- wording -------------------------------------------------------------------------------
# Each setting has a unit, openings, additions, subtractions and questions. Placeholders:
# {name}, {P} (pronoun, capitalised), {n} (a number). The cue words that solve() reads are
# the verbs in _ADD_CUE / _SUB_CUE and the phrases in _MUL_CUE / _DIV_CUE.

_SETTINGS: dict[str, dict[str, tuple[str, ...]]] = {
    "apples": {
        "start": ("{name} has {n} apples.", "{name} picks {n} apples in the orchard."),
        "add": (
            "{P} buys {n} more apples at the market.",
            "{P} picks {n} more apples from the tree.",
            "A neighbor gives {O} {n} more apples.",
        ),
        "sub": (
            "{P} eats {n} of the apples.",
            "{P} gives {n} apples to a neighbor.",
            "{P} uses {n} apples to bake a pie.",
        ),
        "question": ("How many apples does {name} have now?", "How many apples are there in the end?"),
    },
    "tickets": {
        "start": (
            "{name} runs a theater with {n} tickets for tonight's show.",
            "{name} has {n} raffle tickets.",
        ),
        "add": (
            "The box office prints {n} extra tickets.",
            "{P} receives {n} more tickets from the organizer.",
            "Later {P_lower} finds {n} more tickets in a drawer.",
        ),
        "sub": (
            "{P} sells {n} tickets before noon.",
            "{P} gives {n} tickets to friends.",
            "Then {P_lower} sells {n} tickets at the door.",
        ),
        "question": ("How many tickets are left?", "How many tickets remain at the end?"),
    },
    "pages": {
        "start": ("{name} has written {n} pages in a journal.", "{name}'s notebook has {n} pages filled."),
        "add": (
            "{P} writes {n} more pages on Monday.",
            "{P} fills {n} more pages over the weekend.",
            "The next evening {P_lower} writes {n} more pages.",
        ),
        "sub": (
            "{P} tears out {n} pages that had mistakes.",
            "{P} removes {n} pages of old notes.",
            "Then {P_lower} tears out {n} pages to start over.",
        ),
        "question": ("How many pages are filled now?", "How many filled pages does {name} have in the end?"),
    },
    "money": {
        "start": ("{name} has ${n} in a wallet.", "{name} saved ${n} for the summer."),
        "add": (
            "{P} earns ${n} mowing lawns.",
            "{P} receives ${n} as a birthday gift.",
            "Then {P_lower} earns ${n} more babysitting.",
        ),
        "sub": (
            "{P} spends ${n} on lunch.",
            "{P} pays ${n} for a concert ticket.",
            "Later {P_lower} spends ${n} on a new book.",
        ),
        "question": ("How many dollars does {name} have now?", "How much money, in dollars, is left?"),
    },
    "marbles": {
        "start": ("{name} has {n} marbles in a jar.", "There are {n} marbles in {name}'s bag."),
        "add": (
            "{P} wins {n} more marbles at recess.",
            "{P} finds {n} more marbles under the couch.",
            "A friend gives {O} {n} more marbles.",
        ),
        "sub": (
            "{P} loses {n} marbles in the park.",
            "{P} trades away {n} marbles.",
            "Then {P_lower} gives {n} marbles to a younger cousin.",
        ),
        "question": ("How many marbles does {name} have now?", "How many marbles are left?"),
    },
    "cookies": {
        "start": ("{name} bakes {n} cookies.", "{name} has a tray of {n} cookies."),
        "add": (
            "{P} bakes {n} more cookies in the afternoon.",
            "{P} gets {n} more cookies from a bakery.",
            "A neighbor brings {O} {n} more cookies.",
        ),
        "sub": (
            "{P} eats {n} of the cookies.",
            "{P} packs {n} cookies for a friend to take home.",
            "Then {P_lower} gives {n} cookies to the class.",
        ),
        "question": ("How many cookies are there now?", "How many cookies does {name} have in the end?"),
    },
    "stickers": {
        "start": ("{name} owns {n} stickers.", "{name} collects {n} stickers."),
        "add": (
            "{P} collects {n} more stickers at school.",
            "{P} gets {n} more stickers from a pen pal.",
            "Later {P_lower} buys {n} more stickers.",
        ),
        "sub": (
            "{P} uses {n} stickers on a poster.",
            "{P} gives {n} stickers to a cousin.",
            "Then {P_lower} loses {n} stickers on the bus.",
        ),
        "question": ("How many stickers does {name} have now?", "How many stickers are there in the end?"),
    },
}

_MUL: tuple[str, ...] = (
    "Later the number of {unit} becomes {n} times as many.",
    "By the end of the week {P_lower} has {n} times as many {unit}.",
    "Then the total is multiplied by {n}.",
)
_DIV: tuple[str, ...] = (
    "{P} splits the {unit} into {n} equal groups and keeps one group.",
    "Then the {unit} are shared equally among {n} people, and {P_lower} keeps one share.",
    "{P} divides the {unit} equally into {n} boxes and keeps just one box.",
)

_NAMES: tuple[tuple[str, str], ...] = (
    ("Ava", "f"), ("Ben", "m"), ("Chloe", "f"), ("Diego", "m"), ("Emma", "f"),
    ("Farid", "m"), ("Grace", "f"), ("Hiro", "m"), ("Ines", "f"), ("Jamal", "m"),
    ("Kira", "f"), ("Liam", "m"), ("Maya", "f"), ("Noah", "m"), ("Olga", "f"),
    ("Pablo", "m"), ("Quinn", "f"), ("Ravi", "m"), ("Sofia", "f"), ("Tomas", "m"),
)
_PRONOUNS = {"f": ("She", "her"), "m": ("He", "him")}

_NUMBER = r"\$?(\d+)"
_ADD_CUE = re.compile(
    r"\b(?:buys|picks|prints|receives|writes|fills|earns|wins|finds|bakes|gets|collects|brings|"
    r"gives (?:him|her))\b[^.?!]*?"
    + _NUMBER
)
_SUB_CUE = re.compile(
    r"\b(?:eats|gives|sells|tears out|removes|spends|pays|loses|trades away|packs|uses)\b[^.?!]*?" + _NUMBER
)
_MUL_CUE = re.compile(r"(\d+) times as many|multiplied by (\d+)")
_DIV_CUE = re.compile(r"into (\d+) equal|equally (?:into|among) (\d+)")
_START = re.compile(_NUMBER + r"(?: [a-z]+)?? (apples|tickets|pages|marbles|cookies|stickers)\b|\$(\d+)")
_SENTENCE = re.compile(r"(?<=[.?!])\s+")


@lru_cache(maxsize=65536)
def parse(question: str) -> Problem | None:
    """Parse a question written by :func:`generate_problems`; ``None`` if it is not one."""
    sentences = _SENTENCE.split(question.strip())
    if len(sentences) < 3 or not sentences[-1].endswith("?") or any(c.isdigit() for c in sentences[-1]):
        return None
    first = _START.search(sentences[0])
    if first is None:
        return None
    start, unit = (first.group(1), first.group(2)) if first.group(3) is None else (first.group(3), "dollars")
    ops: list[Op] = []
    for sentence in sentences[1:-1]:
        op = _parse_op(sentence)
        if op is None:
            return None
        ops.append(op)
    problem = Problem(int(start), tuple(ops), unit)
    value = problem.start
    for op_name, n in problem.ops:
        if op_name == "div" and (n == 0 or value % n):
            return None
        value = _apply(value, op_name, n)
    return problem


def _parse_op(sentence: str) -> Op | None:
    # Multiplication and division cues are checked first: their sentences may contain an
    # addition verb ("keeps", "has") but never a bare operand after one.
    for cue, name in ((_MUL_CUE, "mul"), (_DIV_CUE, "div"), (_ADD_CUE, "add"), (_SUB_CUE, "sub")):
        match = cue.search(sentence)
        if match is not None:
            number = next(g for g in match.groups() if g is not None)
            return name, int(number)
    return None


def solve(question: str) -> int | None:
    """The true integer answer to a generated question, or ``None`` if it cannot be parsed."""
    problem = parse(question)
    return None if problem is None else problem.answer


def difficulty(question: str) -> int:
    """Level 1..3 of a question: the number of operations (unparseable questions count as 2)."""
    problem = parse(question)
    if problem is None:
        return 2
    return max(1, min(3, len(problem.ops)))


_VERBS = {"add": "adding", "sub": "taking away", "mul": "multiplying by", "div": "dividing by"}
_SYMBOLS = {"add": "+", "sub": "-", "mul": "*", "div": "/"}


def steps(question: str | Problem, *, final: int | None = None) -> list[str] | None:
    """A short worked solution, one line per operation; ``None`` if the question does not parse.

    ``final`` overrides the result of the last step, to write reasoning with an arithmetic
    slip in it.
    """
    problem = parse(question) if isinstance(question, str) else question
    if problem is None:
        return None
    lines = [f"Start with {problem.start} {problem.unit}."]
    value = problem.start
    for index, (op, n) in enumerate(problem.ops):
        result = _apply(value, op, n)
        if final is not None and index == len(problem.ops) - 1:
            result = final
        lines.append(f"{_VERBS[op].capitalize()} {n}: {value} {_SYMBOLS[op]} {n} = {result}.")
        value = result
    return lines


# --- generation ----------------------------------------------------------------------------


def _draw_ops(rng: random.Random, level: int) -> list[str]:
    if level < 3:
        return [rng.choice(("add", "sub")) for _ in range(level)]
    ops = [rng.choice(("add", "sub")) for _ in range(3)]
    ops[rng.randrange(3)] = rng.choice(("mul", "div"))
    if rng.random() < 0.25:
        ops[rng.randrange(3)] = rng.choice(("mul", "div"))
    return ops


def _draw_numbers(rng: random.Random, ops: list[str]) -> list[int] | None:
    value = rng.randint(6, 60)
    numbers = [value]
    for op in ops:
        if op == "add":
            n = rng.randint(2, 40)
        elif op == "sub":
            if value < 3:
                return None
            n = rng.randint(1, max(1, min(value - 1, 40)))
        elif op == "mul":
            if value > 120:
                return None
            n = rng.randint(2, 5)
        else:
            divisors = [k for k in range(2, 9) if value % k == 0]
            if not divisors:
                return None
            n = rng.choice(divisors)
        value = _apply(value, op, n)
        numbers.append(n)
    return numbers


def _write(rng: random.Random, ops: list[str], numbers: list[int]) -> str:
    unit_key = rng.choice(sorted(_SETTINGS))
    setting = _SETTINGS[unit_key]
    unit = "dollars" if unit_key == "money" else unit_key
    name, gender = rng.choice(_NAMES)
    subject, obj = _PRONOUNS[gender]
    fill = {"name": name, "P": subject, "P_lower": subject.lower(), "O": obj, "unit": unit}
    sentences = [rng.choice(setting["start"]).format(n=numbers[0], **fill)]
    used: set[str] = set()
    for op, n in zip(ops, numbers[1:], strict=True):
        pool = setting[op] if op in ("add", "sub") else (_MUL if op == "mul" else _DIV)
        # The same sentence twice in one story reads like a typo.
        template = rng.choice([t for t in pool if t not in used] or list(pool))
        used.add(template)
        sentences.append(template.format(n=n, **fill))
    sentences.append(rng.choice(setting["question"]).format(**fill))
    return " ".join(sentences)


def generate_problems(n: int, *, seed: int, levels: tuple[int, ...] = (1, 2, 3)) -> list[ProblemRecord]:
    """``n`` distinct word problems, levels drawn evenly from ``levels``, reproducible by ``seed``.

    Each record is ``{"question": str, "answer": str(int), "level": int}``; ``solve(question)``
    returns ``int(answer)`` for every record.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    if not levels or any(level not in (1, 2, 3) for level in levels):
        raise ValueError("levels must be a non-empty subset of (1, 2, 3)")
    rng = random.Random(seed)
    seen: set[str] = set()
    records: list[ProblemRecord] = []
    attempts = 0
    while len(records) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"could not generate {n} distinct problems")
        level = levels[len(records) % len(levels)]
        ops = _draw_ops(rng, level)
        numbers = _draw_numbers(rng, ops)
        if numbers is None:
            continue
        question = _write(rng, ops, numbers)
        if question in seen:
            continue
        answer = Problem(numbers[0], tuple(zip(ops, numbers[1:], strict=True)), "").answer
        if solve(question) != answer:
            # The wording and the parser have drifted apart: a bug, never a data point.
            raise RuntimeError(f"generated question does not parse back to {answer}: {question!r}")
        seen.add(question)
        records.append({"question": question, "answer": str(answer), "level": level})
    rng.shuffle(records)
    return records
