"""Reading what DSPy's adapters send the simulator, and writing replies they can parse.

:func:`_read_prompt` turns a request's system message and conversation turns into a
:class:`_Prompt`: the output fields and their types (``_Field``), the instruction after
"your objective is:" and the adapter's format (``_System``) from the system message,
few-shot demos from earlier user/assistant pairs and the inputs from the last user message.
ChatAdapter, JSONAdapter and XMLAdapter prompts are all understood; a prompt that no
adapter wrote (``lm("...")``) becomes a ``question -> reasoning, answer`` prompt answered in
prose.

:func:`_render` writes field values back in the format of the adapter that asked,
:func:`_malformed` writes an unusable reply for failure injection, and :func:`_filler` makes
a plausible value of any declared type (str, int, float, bool, lists, dicts, Literal
choices, pydantic models via the JSON schema the adapter shows) for fields the response
surface in :mod:`dmipro.lm._surface` says nothing about.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

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


# --- filler of any declared type -----------------------------------------------------------

_FILLER = (
    "The question describes a short everyday situation.",
    "This follows from the information given.",
    "The relevant details are in the question.",
    "A brief note on the input.",
)


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
