"""``package.module:attr`` references and the import allowlist.

Jobs name their program, metric and dataset loaders by reference so that they can
travel to workers as JSON. A reference is imported only when its module is one of the
prefixes in ``DMIPRO_ALLOWED_MODULES`` (or below one): the check runs before anything
is imported, so a hostile job cannot make a worker execute a module of its choosing.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from dmipro.config import get_settings
from dmipro.errors import RefError

__all__ = ["check_allowed", "ensure_importable", "import_ref", "is_ref", "parse_ref", "ref_of"]

_REF = re.compile(
    r"^(?P<module>[A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*):(?P<attr>[A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*)$"
)


def is_ref(value: object) -> bool:
    """True for a string shaped like ``package.module:attr``."""
    return isinstance(value, str) and _REF.match(value) is not None


def parse_ref(ref: str, *, field: str | None = None) -> tuple[str, str]:
    """Split ``package.module:attr`` into its module and attribute path."""
    match = _REF.match(ref) if isinstance(ref, str) else None
    if match is None:
        raise RefError(f"{ref!r} is not a reference; write it as 'package.module:attribute'", field=field)
    return match["module"], match["attr"]


def check_allowed(module: str, allowed: Iterable[str] | None = None, *, field: str | None = None) -> None:
    """Raise :class:`RefError` unless ``module`` is an allowed prefix or lies below one."""
    prefixes = tuple(get_settings().allowed_modules if allowed is None else allowed)
    if any(module == p or module.startswith(p + ".") for p in prefixes):
        return
    shown = ",".join(prefixes) or "(none)"
    raise RefError(
        f"module {module!r} is not in DMIPRO_ALLOWED_MODULES ({shown}); "
        "add its package prefix there to allow it",
        field=field,
    )


def import_ref(ref: str, *, allowed: Iterable[str] | None = None, field: str | None = None) -> Any:
    """Import ``package.module:attr`` after checking the allowlist, and return the attribute."""
    module_name, attr_path = parse_ref(ref, field=field)
    check_allowed(module_name, allowed, field=field)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise RefError(
            f"cannot import {module_name!r} ({exc}); check the module path and sys.path", field=field
        ) from exc
    except Exception as exc:  # the module itself failed while importing
        raise RefError(f"importing {module_name!r} raised {type(exc).__name__}: {exc}", field=field) from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise RefError(f"{module_name!r} has no attribute {attr_path!r}", field=field) from None
    return obj


def ref_of(obj: Any, *, field: str | None = None) -> str:
    """The reference that imports ``obj`` back, or :class:`RefError` if there is none."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not module or not qualname or module == "__main__" or "<" in qualname:
        raise RefError(
            f"{obj!r} is not importable by reference (a lambda, a local or a __main__ object); "
            "define it at module level in an importable module",
            field=field,
        )
    return f"{module}:{qualname}"


def ensure_importable(paths: Sequence[Path | str]) -> None:
    """Put ``paths`` (a job file's directory, the current directory) at the front of ``sys.path``.

    They stay for the life of the process: references are resolved lazily (a metric may
    import helpers when first called), so removing them again would break later imports.
    """
    for p in reversed([str(Path(p).resolve()) for p in paths]):
        if p not in sys.path:
            sys.path.insert(0, p)
