"""``package.module:attr`` references and the import allowlist.

Jobs name their program, metric and dataset loaders by reference so that they can
travel to workers as JSON. A reference is imported only when its module is one of the
prefixes in ``DMIPRO_ALLOWED_MODULES`` (or below one): the check runs before anything
is imported, so a hostile job cannot make a worker execute a module of its choosing.

The attribute path is held to what the allowlist means, too: it walks only through
objects *defined in* allowed modules (never through a module object that is not allowed,
as in ``examples.app:dspy.clients.lm.os.abort``), never names a ``_``-prefixed attribute
(``__globals__``, ``__builtins__``), and a function, class or module it ends on must
itself come from an allowed module. Data (a list of records, a program instance) found
as an attribute of an allowed module is fine.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import types
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from dmipro.config import get_settings
from dmipro.errors import RefError

__all__ = [
    "check_allowed",
    "ensure_importable",
    "import_ref",
    "is_ref",
    "parse_ref",
    "ref_of",
    "trusted_code_paths",
]

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


def _allowed(module: object, prefixes: tuple[str, ...]) -> bool:
    return isinstance(module, str) and any(module == p or module.startswith(p + ".") for p in prefixes)


def _home(obj: Any) -> str | None:
    """The module ``obj`` was defined in, for the kinds of objects that have one."""
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    if inspect.isclass(obj) or inspect.isroutine(obj):
        return getattr(obj, "__module__", None) or "?"
    return None


def import_ref(ref: str, *, allowed: Iterable[str] | None = None, field: str | None = None) -> Any:
    """Import ``package.module:attr`` after checking the allowlist, and return the attribute.

    Every step of a dotted attribute path must stay within allowed modules (see the
    module docstring); a step that leaves them is a :class:`RefError`, raised before the
    object is used.
    """
    module_name, attr_path = parse_ref(ref, field=field)
    prefixes = tuple(get_settings().allowed_modules if allowed is None else allowed)
    check_allowed(module_name, prefixes, field=field)
    parts = attr_path.split(".")
    private = [p for p in parts if p.startswith("_")]
    if private:
        raise RefError(f"{ref!r} names the private attribute {private[0]!r}; a reference may name only "
                       "public attributes", field=field)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise RefError(
            f"cannot import {module_name!r} ({exc}); check the module path and sys.path", field=field
        ) from exc
    except Exception as exc:  # the module itself failed while importing
        raise RefError(f"importing {module_name!r} raised {type(exc).__name__}: {exc}", field=field) from exc
    walked = module_name
    for i, part in enumerate(parts):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise RefError(f"{module_name!r} has no attribute {attr_path!r}", field=field) from None
        walked = f"{walked}{':' if i == 0 else '.'}{part}"
        home = _home(obj)
        if home is None and i < len(parts) - 1:
            home = type(obj).__module__  # walking on through an instance: its class must be ours
        if home is not None and not _allowed(home, prefixes):
            shown = ",".join(prefixes) or "(none)"
            raise RefError(
                f"{ref!r} leaves the allowed modules at {walked!r}, which comes from {home!r}, not from "
                f"DMIPRO_ALLOWED_MODULES ({shown}); name an object defined in an allowed module",
                field=field,
            )
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


def trusted_code_paths() -> list[Path]:
    """Directories references may be imported from besides installed packages.

    The current directory (where the operator started the worker or the CLI) and the
    directories in ``DMIPRO_CODE_PATHS`` — never a job file's own directory, which may be a
    bundle someone handed over, holding its own ``examples/`` to shadow the real one.
    """
    return [Path.cwd(), *get_settings().code_paths]


def ensure_importable(paths: Sequence[Path | str]) -> None:
    """Put ``paths`` at the *end* of ``sys.path``, after the standard library and installed packages.

    At the end, so a directory can add modules but never shadow an installed package. They
    stay for the life of the process: references are resolved lazily (a metric may import
    helpers when first called), so removing them again would break later imports.
    """
    for p in [str(Path(p).resolve()) for p in paths]:
        if p not in sys.path:
            sys.path.append(p)
