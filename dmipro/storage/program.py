"""A program's state as DSPy saves it, and rebuilding a program from a stored record.

``program_state(module)`` is the dict ``module.save("x.json")`` writes, built with DSPy's
own ``dump_state`` and dependency versions; ``state_bytes(state)`` is that file's exact
bytes (both live in :mod:`dmipro.storage._state`, beneath the record). ``build_program(record)``
imports the record's program reference, checks that the code still has the predictors and
signature fields the state was saved from (DSPy itself zips fields by position and never
checks names), and loads the state.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from dmipro.errors import DmiproError, RefError, StorageError
from dmipro.jobs._load import instantiate
from dmipro.storage._state import lm_info, predictor_signatures, predictor_states, program_state, state_bytes
from dmipro.storage.record import ProgramRecord, strip_predictor_lms

if TYPE_CHECKING:
    import dspy

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


def build_program(record: ProgramRecord, *, program_ref: str | None = None) -> dspy.Module:
    """Rebuild the optimized program of ``record`` as a ready ``dspy.Module``.

    The program reference (``record.metadata.program_ref`` unless ``program_ref`` is given)
    is imported through the allowlist and instantiated (see :func:`instantiate`). The
    code's predictors and signature fields are checked against the record before DSPy's
    ``load_state`` runs, so a changed signature fails here with a message saying so.
    """
    ref = program_ref or record.metadata.program_ref
    try:
        program = instantiate(ref)
    except RefError as exc:
        raise StorageError(f"cannot rebuild the program: {exc}") from exc
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
