"""The public surface: ``__all__`` of dmipro and of each subpackage names exactly its public members."""

from __future__ import annotations
import __future__

import importlib
import importlib.metadata
import inspect
import pkgutil
import types
from typing import Any

import pytest

import dmipro

PRIVATE_EXPORTS = {"__version__"}
NOT_API = {"migrations"}
"""Subpackages that are implementation, not API (Alembic's script directory)."""

SUBPACKAGES = sorted(
    f"dmipro.{m.name}" for m in pkgutil.iter_modules(dmipro.__path__) if m.ispkg and m.name not in NOT_API
)


def _defined_in(value: Any, package: str) -> bool:
    """Whether ``value`` comes from ``package`` or a module below it.

    A helper a module imports for its own use (``Any``, or ``ConfigError`` in an adapter
    package) is not one of its members; constants without a ``__module__`` are.
    """
    module = getattr(value, "__module__", None)
    return not isinstance(module, str) or module == package or module.startswith(package + ".")


def _public_members(module: types.ModuleType) -> set[str]:
    return {
        name
        for name, value in vars(module).items()
        if (not name.startswith("_") or name in PRIVATE_EXPORTS)
        and not isinstance(value, types.ModuleType | __future__._Feature)
        and _defined_in(value, module.__name__)
    }


def _check_exports(module: types.ModuleType) -> None:
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{module.__name__} has no __all__"
    assert len(exported) == len(set(exported)), f"{module.__name__}.__all__ has duplicates"
    missing = [name for name in exported if not hasattr(module, name)]
    assert not missing, f"{module.__name__}.__all__ names what it does not have: {missing}"
    unexported = sorted(_public_members(module) - set(exported))
    assert not unexported, f"{module.__name__} has public members missing from __all__: {unexported}"


def test_dmipro_exports_exactly_its_public_members() -> None:
    _check_exports(dmipro)


def test_the_version_is_the_installed_distributions() -> None:
    assert dmipro.__version__ == importlib.metadata.version("dmipro")


def test_star_import_resolves_every_name() -> None:
    namespace: dict[str, Any] = {}
    exec("from dmipro import *", namespace)
    assert set(dmipro.__all__) <= set(namespace)


def test_the_top_level_api_is_documented() -> None:
    undocumented = [
        name
        for name in dmipro.__all__
        if (inspect.isclass(getattr(dmipro, name)) or inspect.isfunction(getattr(dmipro, name)))
        and not inspect.getdoc(getattr(dmipro, name))
    ]
    assert not undocumented


def test_the_top_level_names_the_user_entry_points() -> None:
    for name in ("evaluate", "optimize", "submit", "load", "load_job", "DmiproError", "JobSpec", "MIPROv2"):
        assert name in dmipro.__all__


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_each_subpackage_exports_exactly_its_public_members(name: str) -> None:
    _check_exports(importlib.import_module(name))


def test_ab_is_an_attribute_of_the_top_package() -> None:
    import dmipro.ab

    assert dmipro.ab is importlib.import_module("dmipro.ab") and "ab" in dmipro.__all__
    for name in ("create", "get", "list", "monitor", "offline", "plan"):
        assert inspect.getdoc(getattr(dmipro.ab, name)), name


def test_every_error_is_exported_at_the_top() -> None:
    import dmipro.errors

    assert set(dmipro.errors.__all__) <= set(dmipro.__all__)
