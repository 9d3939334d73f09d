"""A program's state as DSPy saves it: capturing it from a module, its exact bytes, its LM.

The lowest piece of program storage: :mod:`dmipro.storage.record` builds records from
these functions and :mod:`dmipro.storage.program` rebuilds programs from records, so
both import this module and neither imports the other's direction.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson

from dmipro.errors import StorageError

if TYPE_CHECKING:
    import dspy

__all__ = [
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
