"""A program's state as DSPy saves it, and rebuilding a program from a stored record.

``program_state(module)`` is the dict ``module.save("x.json")`` writes, built with DSPy's
own ``dump_state`` and dependency versions; ``state_bytes(state)`` is that file's exact
bytes. ``build_program(record)`` imports the record's program reference, checks that the
code still has the predictors and signature fields the state was saved from (DSPy itself
zips fields by position and never checks names), and loads the state.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson

from dmipro.errors import DmiproError, RefError, StorageError
from dmipro.refs import import_ref

if TYPE_CHECKING:
    import dspy

    from dmipro.storage.record import ProgramRecord

__all__ = [
    "build_program",
    "check_signatures",
    "instantiate",
    "lm_info",
    "predictor_signatures",
    "predictor_states",
    "program_state",
    "state_bytes",
]

_SECRET_PARTS = frozenset(
    {
        "key",
        "apikey",
        "token",
        "secret",
        "password",
        "passwd",
        "auth",
        "authorization",
        "credential",
        "credentials",
        "cookie",
        "cookies",
        "header",
        "headers",
    }
)


def _is_secret(key: str) -> bool:
    parts = re.split(r"[^a-z0-9]+", key.lower())
    return any(p in _SECRET_PARTS for p in parts) or key.lower().endswith("key")


def program_state(module: dspy.Module) -> dict[str, Any]:
    """The dict ``module.save("x.json")`` writes: ``dump_state()`` plus ``metadata.dependency_versions``.

    The result is passed through JSON once, so it equals what reading the saved file back
    gives; ``state_bytes(program_state(m))`` is byte for byte the file DSPy writes.
    """
    from dspy.utils.saving import get_dependency_versions

    state = module.dump_state()
    state["metadata"] = {"dependency_versions": get_dependency_versions()}
    try:
        return orjson.loads(orjson.dumps(state))  # type: ignore[no-any-return]
    except TypeError as exc:
        raise StorageError(
            f"the program's state is not JSON-serializable ({exc}); DSPy's JSON save would fail too"
        ) from exc


def state_bytes(state: Mapping[str, Any]) -> bytes:
    """Serialize a program state exactly as DSPy's ``BaseModule.save`` does for a ``.json`` path."""
    return orjson.dumps(state, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)


def predictor_states(program: dspy.Module, state: Mapping[str, Any]) -> dict[str, Any]:
    """Split a saved state into one entry per named parameter of ``program``.

    A bare ``dspy.Predict`` saves a flat predictor dict; it is returned under DSPy's own
    name for it, ``"self"``.
    """
    import dspy

    if isinstance(program, dspy.Predict):
        return {"self": {k: v for k, v in state.items() if k != "metadata"}}
    return {k: v for k, v in state.items() if k != "metadata"}


def predictor_signatures(program: dspy.Module) -> dict[str, dict[str, list[str]]]:
    """Input and output field names of each predictor, keyed like the saved state."""
    import dspy

    out: dict[str, dict[str, list[str]]] = {}
    for name, param in program.named_parameters():
        if isinstance(param, dspy.Predict):
            sig = param.signature
            out[name] = {"inputs": list(sig.input_fields), "outputs": list(sig.output_fields)}
    return out


def check_signatures(
    program: dspy.Module,
    state: Mapping[str, Any],
    saved_signatures: Mapping[str, Any] | None,
    *,
    program_ref: str,
) -> None:
    """Raise :class:`StorageError` unless ``program`` has the predictors and fields ``state`` was saved from.

    ``saved_signatures`` are the field names recorded at save time; without them only the
    predictor names and field counts can be compared.
    """
    code_names = [name for name, _ in program.named_parameters()]
    saved = predictor_states(program, state)
    missing = sorted(set(code_names) - set(saved))
    extra = sorted(set(saved) - set(code_names))
    if missing or extra:
        raise StorageError(
            f"the saved program does not match {program_ref}: "
            + "; ".join(
                part
                for part in (
                    f"predictors in the code but not saved: {', '.join(missing)}" if missing else "",
                    f"predictors saved but not in the code: {', '.join(extra)}" if extra else "",
                )
                if part
            )
            + ". The program's structure changed since it was optimized; re-run the optimization "
            "or point the program reference at the code it was saved from"
        )
    code_sigs = predictor_signatures(program)
    problems = []
    for name, fields in code_sigs.items():
        pstate = saved[name]
        count = len(fields["inputs"]) + len(fields["outputs"])
        saved_fields = pstate.get("signature", {}).get("fields", [])
        if saved_signatures is not None:
            want = _field_names(saved_signatures.get(name))
            if want is None:
                problems.append(f"{name}: no saved field names")
                continue
            if want["inputs"] != fields["inputs"] or want["outputs"] != fields["outputs"]:
                problems.append(f"{name}: saved {_show(want)}, the code has {_show(fields)}")
                continue
        if len(saved_fields) != count:
            problems.append(f"{name}: saved {len(saved_fields)} fields, the code's signature has {count}")
    if problems:
        raise StorageError(
            f"the signature fields of {program_ref} no longer match the saved program ("
            + "; ".join(problems)
            + "). Re-run the optimization for the new signature, or restore the old field names"
        )


def _field_names(value: Any) -> dict[str, list[str]] | None:
    if value is None:
        return None
    if hasattr(value, "model_dump"):
        value = value.model_dump()
    return {"inputs": list(value.get("inputs", [])), "outputs": list(value.get("outputs", []))}


def _show(fields: Mapping[str, list[str]]) -> str:
    return f"{', '.join(fields.get('inputs', []))} -> {', '.join(fields.get('outputs', []))}"


def instantiate(program_ref: str) -> dspy.Module:
    """Import ``program_ref`` through the allowlist and make a fresh ``dspy.Module`` of it.

    A module instance is deep-copied (the shared object is never changed); a class or a
    factory is called with no arguments.
    """
    import dspy

    try:
        target = import_ref(program_ref, field="program")
    except RefError as exc:
        raise StorageError(f"cannot rebuild the program: {exc}") from exc
    if isinstance(target, dspy.Module):
        program = target.deepcopy()
    elif callable(target):
        try:
            program = target()
        except Exception as exc:
            raise StorageError(
                f"calling {program_ref} with no arguments raised {type(exc).__name__}: {exc}; "
                "the program reference must be a dspy.Module, a class or a zero-argument factory"
            ) from exc
    else:
        raise StorageError(f"{program_ref} is a {type(target).__name__}, not a dspy.Module, class or factory")
    if not isinstance(program, dspy.Module):
        raise StorageError(f"{program_ref} built a {type(program).__name__}, not a dspy.Module")
    return program


def build_program(record: ProgramRecord, *, program_ref: str | None = None) -> dspy.Module:
    """Rebuild the optimized program of ``record`` as a ready ``dspy.Module``.

    The program reference (``record.metadata.program_ref`` unless ``program_ref`` is given)
    is imported through the allowlist and instantiated (see :func:`instantiate`). The
    code's predictors and signature fields are checked against the record before DSPy's
    ``load_state`` runs, so a changed signature fails here with a message saying so.
    """
    from dmipro.storage.record import strip_predictor_lms

    ref = program_ref or record.metadata.program_ref
    program = instantiate(ref)
    check_signatures(program, record.program, record.metadata.signatures or None, program_ref=ref)
    state = copy.deepcopy(record.program)
    strip_predictor_lms(state)  # records are stripped when read; a built program never carries a file's LM
    try:
        program.load_state(state)
    except DmiproError:
        raise
    except Exception as exc:
        raise StorageError(
            f"DSPy could not load the saved state into {ref}: {type(exc).__name__}: {exc}"
        ) from exc
    return program


def lm_info(lm: Any) -> dict[str, Any] | None:
    """The model name and non-secret parameters of a ``dspy.LM`` (or a dict of them).

    Keys that look like credentials or headers (``api_key``, ``token``, ``extra_headers``
    ...) are dropped at every level, as are values that are not plain JSON.
    """
    if lm is None:
        return None
    if isinstance(lm, Mapping):
        raw = dict(lm)
    else:
        raw = {"model": getattr(lm, "model", None), "model_type": getattr(lm, "model_type", None)}
        raw.update(getattr(lm, "kwargs", {}) or {})
    cleaned = _non_secret(raw)
    return cleaned if isinstance(cleaned, dict) else None


_DROP = object()


def _non_secret(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str) or _is_secret(key):
                continue
            cleaned = _non_secret(item)
            if cleaned is not _DROP:
                out[key] = cleaned
        return out
    if isinstance(value, list | tuple):
        return [c for c in (_non_secret(v) for v in value) if c is not _DROP]
    return _DROP
