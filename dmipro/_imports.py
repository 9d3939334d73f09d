"""One way to load an optional extra, with an error that says which extra to install.

Optional backends (Celery, RQ, OpenTelemetry, Langfuse, New Relic, matplotlib) live
behind ``dmipro[...]`` extras and load only when used, so ``import dmipro`` needs none
of them. Every such import goes through :func:`try_import`; a missing library then
fails with a :class:`~dmipro.errors.ConfigError` naming the ``pip install`` line,
never with a bare ``ModuleNotFoundError`` from deep inside a run.

``try_import`` is the function form, for a module loaded on first use::

    plt = try_import("matplotlib.pyplot", extra="bench", purpose="plotting")

and ``guarded`` the context-manager form, for a module whose top-level imports are
all optional (the Celery and RQ adapters)::

    with guarded(extra="celery", purpose="the Celery executor"):
        from celery import Celery
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

from dmipro.errors import ConfigError

__all__ = ["guarded", "missing_extra_error", "try_import"]


def missing_extra_error(extra: str, purpose: str, exc: ImportError) -> ConfigError:
    """The error for ``purpose`` whose library (from ``dmipro[extra]``) is not installed."""
    missing = exc.name or str(exc)
    return ConfigError(f"{purpose} needs the {extra} extra ({missing}): pip install 'dmipro[{extra}]'")


def try_import(module: str, *, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise a :class:`ConfigError` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise missing_extra_error(extra, purpose, exc) from exc


@contextmanager
def guarded(*, extra: str, purpose: str) -> Iterator[None]:
    """Turn an ``ImportError`` raised inside the block into the missing-extra error."""
    try:
        yield
    except ImportError as exc:
        raise missing_extra_error(extra, purpose, exc) from exc
