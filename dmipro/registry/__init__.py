"""The signature registry: named programs, immutable numbered versions, deploy and rollback.

    import dmipro.registry

    dmipro.registry.register("math_qa", record)          # -> math_qa@1, @2, ...
    dmipro.registry.deploy("math_qa", 2)
    program = dmipro.registry.load("math_qa")            # the deployed version, a dspy.Module
    program = dmipro.registry.load("math_qa@1")          # a given version
    dmipro.registry.rollback("math_qa")                  # back to the previously deployed one

The module functions use the configured database; :class:`Registry` takes another URL.
"""

from __future__ import annotations

from dmipro.registry.diff import diff_programs
from dmipro.registry.names import NAME_PATTERN, format_spec, parse_spec, validate_name
from dmipro.registry.registry import (
    Registry,
    deploy,
    diff,
    get,
    history,
    list_names,
    load,
    register,
    rollback,
    show,
    versions,
)
from dmipro.registry.values import Deployment, NameInfo, VersionInfo, default_actor

__all__ = [
    "NAME_PATTERN",
    "Deployment",
    "NameInfo",
    "Registry",
    "VersionInfo",
    "default_actor",
    "deploy",
    "diff",
    "diff_programs",
    "format_spec",
    "get",
    "history",
    "list_names",
    "load",
    "parse_spec",
    "register",
    "rollback",
    "show",
    "validate_name",
    "versions",
]
