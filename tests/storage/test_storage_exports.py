"""The public surface of dmipro.storage and dmipro.registry is exactly their ``__all__``."""

from __future__ import annotations

import types

import pytest

import dmipro.registry
import dmipro.storage


@pytest.mark.parametrize("package", [dmipro.storage, dmipro.registry])
def test_all_lists_every_public_member(package: types.ModuleType) -> None:
    public = {
        name
        for name, value in vars(package).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType) and name != "annotations"
    }
    assert set(package.__all__) == public
    assert all(hasattr(package, name) for name in package.__all__)
