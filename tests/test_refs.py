"""References: parsing, the import allowlist (checked before importing), attribute paths, ref_of."""

from __future__ import annotations

import re
import sys
import uuid
from pathlib import Path

import pytest

from dmipro.errors import RefError
from dmipro.refs import check_allowed, import_ref, is_ref, parse_ref, ref_of
from examples.math_qa.program import build
from tests.fixtures import refs as fixture_refs


@pytest.mark.parametrize(
    ("ref", "parts"),
    [
        ("examples.math_qa.program:build", ("examples.math_qa.program", "build")),
        ("pkg:attr", ("pkg", "attr")),
        ("a.b:C.D.e", ("a.b", "C.D.e")),
        ("_private.mod:_x", ("_private.mod", "_x")),
    ],
)
def test_parse_ref(ref: str, parts: tuple[str, str]) -> None:
    assert is_ref(ref)
    assert parse_ref(ref) == parts


@pytest.mark.parametrize(
    "ref",
    [
        "examples.math_qa.program",
        "examples/math_qa/program.py:build",
        "pkg:",
        ":attr",
        "pkg::attr",
        "a.:b",
        "1pkg:attr",
        "pkg:attr()",
        "pkg:attr ",
        "data/train.jsonl",
        "",
    ],
)
def test_malformed_refs_are_refused(ref: str) -> None:
    assert not is_ref(ref)
    with pytest.raises(RefError, match="package.module:attribute") as info:
        parse_ref(ref, field="program")
    assert info.value.field == "program"


def test_non_strings_are_not_refs() -> None:
    assert not is_ref(None)
    assert not is_ref(["pkg:attr"])
    with pytest.raises(RefError):
        parse_ref(42, field="metric")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "module", ["examples", "examples.math_qa", "examples.math_qa.program", "tests.fixtures"]
)
def test_allowed_prefixes_and_modules_below_them_pass(module: str) -> None:
    check_allowed(module, ["examples", "tests"])


@pytest.mark.parametrize("module", ["examplesX", "examples_evil", "example", "os", "tests2.x", "my.examples"])
def test_a_prefix_match_is_on_whole_package_names(module: str) -> None:
    with pytest.raises(RefError, match="DMIPRO_ALLOWED_MODULES") as info:
        check_allowed(module, ["examples", "tests"], field="program")
    assert info.value.field == "program"


def test_the_allowlist_comes_from_settings_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from dmipro.config import reload_settings

    assert import_ref("examples.math_qa.program:build") is build
    monkeypatch.setenv("DMIPRO_ALLOWED_MODULES", "tests")
    reload_settings()
    with pytest.raises(
        RefError, match=r"'examples\.math_qa\.program' is not in DMIPRO_ALLOWED_MODULES \(tests\)"
    ):
        import_ref("examples.math_qa.program:build")


@pytest.mark.parametrize("prefix", ["examplesX", "evil"])
def test_a_disallowed_module_is_never_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefix: str
) -> None:
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "imported.txt"
    (tmp_path / f"{name}.py").write_text(
        f"from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('side effect')\n"
        "def build():\n"
        "    return 1\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RefError, match="not in DMIPRO_ALLOWED_MODULES"):
        import_ref(f"{name}:build", field="program")
    assert name not in sys.modules
    assert not marker.exists()
    # The same module, once allowed, imports: the refusal above was the allowlist's doing.
    assert import_ref(f"{name}:build", allowed=[name])() == 1
    assert marker.exists()


def test_attribute_paths_are_followed() -> None:
    assert import_ref("tests.fixtures.refs:Outer.Inner.VALUE") == "deep"
    assert import_ref("tests.fixtures.refs:Outer.Inner.method")() == "called"
    assert import_ref("tests.fixtures.refs:Outer") is fixture_refs.Outer


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("tests.fixtures.refs:Outer.Missing", "has no attribute 'Outer.Missing'"),
        ("tests.fixtures.refs:nothing", "has no attribute 'nothing'"),
        ("tests.fixtures.no_such_module:x", "cannot import 'tests.fixtures.no_such_module'"),
        ("examples.math_qa.nope:build", "cannot import 'examples.math_qa.nope'"),
        ("tests.fixtures.broken:x", "importing 'tests.fixtures.broken' raised RuntimeError"),
    ],
)
def test_unresolvable_refs_say_what_is_wrong(ref: str, message: str) -> None:
    with pytest.raises(RefError, match=re.escape(message)) as info:
        import_ref(ref, field="metric")
    assert info.value.field == "metric"


@pytest.mark.parametrize(
    "obj",
    [
        build,
        fixture_refs.function,
        fixture_refs.Outer,
        fixture_refs.Outer.Inner,
        fixture_refs.Outer.Inner.method,
    ],
    ids=lambda o: o.__qualname__,
)
def test_ref_of_round_trips_through_import_ref(obj: object) -> None:
    ref = ref_of(obj)
    assert is_ref(ref)
    assert import_ref(ref) is obj


def _in_main() -> None:
    return None


_in_main.__module__ = "__main__"


@pytest.mark.parametrize(
    "obj",
    [lambda: None, fixture_refs.make_local(), _in_main, object()],
    ids=["lambda", "local", "__main__", "instance"],
)
def test_ref_of_refuses_what_cannot_be_imported_back(obj: object) -> None:
    with pytest.raises(RefError, match="not importable by reference") as info:
        ref_of(obj, field="metric")
    assert info.value.field == "metric"
