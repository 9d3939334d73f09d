"""Registry names and ``NAME[@VERSION]`` specs."""

from __future__ import annotations

import re

from dmipro import defaults
from dmipro.errors import RegistryError

__all__ = ["NAME_PATTERN", "format_spec", "parse_spec", "validate_name"]

NAME_PATTERN = re.compile(defaults.NAME_PATTERN)
"""A program name: a letter or digit, then up to 127 letters, digits, ``_``, ``.`` or ``-``."""

_VERSION = re.compile(r"[1-9][0-9]{0,8}")


def validate_name(name: object) -> str:
    """Return ``name`` if it is a valid program name, else raise :class:`RegistryError`."""
    if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
        shown = repr(name)[:80]
        raise RegistryError(
            f"invalid program name {shown}: use 1-128 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return name


def parse_spec(spec: object) -> tuple[str, int | None]:
    """Split ``"math_qa@3"`` into ``("math_qa", 3)``; ``"math_qa"`` gives ``("math_qa", None)``."""
    if not isinstance(spec, str):
        raise RegistryError(f"expected NAME or NAME@VERSION, got {type(spec).__name__}")
    name, sep, version = spec.partition("@")
    validate_name(name)
    if not sep:
        return name, None
    if _VERSION.fullmatch(version) is None:
        raise RegistryError(f"invalid version in {spec[:160]!r}: write NAME@N with N a positive whole number")
    return name, int(version)


def format_spec(name: str, version: int | None) -> str:
    """The inverse of :func:`parse_spec`."""
    return name if version is None else f"{name}@{version}"
