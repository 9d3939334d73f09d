"""Shared helpers for typer commands."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import typer

from dmipro.errors import DmiproError

__all__ = ["cli_errors"]

P = ParamSpec("P")
R = TypeVar("R")


def cli_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn a :class:`DmiproError` raised by a command into ``error: ...`` on stderr and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except DmiproError as exc:
            from dmipro.config import mask_passwords

            typer.echo(f"error: {mask_passwords(str(exc))}", err=True)
            raise typer.Exit(2) from exc

    return wrapper
