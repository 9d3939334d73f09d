"""Shared helpers for typer commands."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ParamSpec, TextIO, TypeVar

import typer

from dmipro.config import mask_passwords
from dmipro.errors import DmiproError

__all__ = ["cli_errors", "json_stdout", "write_json"]

P = ParamSpec("P")
R = TypeVar("R")


def cli_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn a :class:`DmiproError` raised by a command into ``error: ...`` on stderr and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except DmiproError as exc:
            typer.echo(f"error: {mask_passwords(str(exc))}", err=True)
            raise typer.Exit(2) from exc

    return wrapper


_json_out: TextIO | None = None


@contextmanager
def json_stdout(enabled: bool) -> Iterator[None]:
    """Keep stdout for the one JSON document a ``--json`` command prints.

    Libraries print: DSPy's ``get_dspy_source_code`` prints a class-based signature's
    source, BootstrapFewShot a summary, a C extension may write to file descriptor 1.
    While this is active both ``sys.stdout`` and descriptor 1 point at stderr; only
    :func:`write_json` reaches the real stdout.
    """
    global _json_out
    if not enabled:
        yield
        return
    previous = sys.stdout
    previous.flush()
    try:
        on_fd1 = previous.fileno() == 1
    except (AttributeError, OSError, ValueError):  # a replaced stdout (a test's capture)
        on_fd1 = False
    saved = os.dup(1) if on_fd1 else None
    real: TextIO = os.fdopen(saved, "w", encoding="utf-8", closefd=False) if saved is not None else previous
    if saved is not None:
        os.dup2(2, 1)
    sys.stdout = sys.stderr
    _json_out = real
    try:
        yield
    finally:
        sys.stdout = previous
        _json_out = None
        if saved is not None:
            sys.stderr.flush()
            real.flush()
            os.dup2(saved, 1)
            os.close(saved)


def write_json(data: Any, *, indent: int | None = None) -> None:
    """Print ``data`` as one JSON document on the real stdout (see :func:`json_stdout`)."""
    out = _json_out or sys.stdout
    out.write(json.dumps(data, default=str, indent=indent, ensure_ascii=indent is None) + "\n")
    out.flush()
