"""The import layers run one way: transport → tasks → application → entry points.

The graph comes from grimp, which reads every import statement of every module, the
ones inside functions included. Imports under ``if TYPE_CHECKING:`` are left out: they
run only for the type checker, never in a process.
"""

from __future__ import annotations

from collections.abc import Iterator

import grimp
import pytest

LAYERS: tuple[tuple[str, ...], ...] = (
    # 0 ground: no dmipro import above it
    ("dmipro.errors", "dmipro.defaults", "dmipro.config", "dmipro._imports", "dmipro._heap", "dmipro.events",
     "dmipro.tracing", "dmipro.refs", "dmipro.db", "dmipro.seeding", "dmipro._cli_util", "dmipro.migrations"),
    # 1 the LM boundary
    ("dmipro.lm",),
    # 2 state: job specs, plans, runtimes and the job store; programs; the registry
    ("dmipro.jobs", "dmipro.storage", "dmipro.registry"),
    # 3 observability subscribers (they read the registry to sync prompts)
    ("dmipro.subscribers", "dmipro.observability"),
    # 4 transport: the task table, the adapters, each broker's wire protocol
    ("dmipro.executor_adapters",),
    # 5 task bodies, registered into the table
    ("dmipro.tasks",),
    # 6 the application: evaluation, proposals, MIPROv2; submitting a job to workers
    ("dmipro.evaluation", "dmipro.propose", "dmipro.teleprompt", "dmipro.jobs.submit"),
    # 7 what is built on optimized programs
    ("dmipro.ab", "dmipro.report"),
    # 8 entry points
    ("dmipro.api", "dmipro.workers", "dmipro.cli", "dmipro"),
)
"""Each module's layer is that of the longest name here it equals or lies under."""

_RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def layer(module: str) -> int:
    """The layer of ``module``; every dmipro module has one."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        rank = _RANK.get(".".join(parts[:n]))
        if rank is not None:
            return rank
    raise AssertionError(f"{module} is in no layer; add it to LAYERS")


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("dmipro", exclude_type_checking_imports=True, cache_dir=None)


def _edges(graph: grimp.ImportGraph) -> Iterator[tuple[str, str]]:
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            yield importer, imported


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Every import cycle, as the strongly connected components with more than one module."""
    edges: dict[str, set[str]] = {m: set() for m in graph.modules}
    for a, b in _edges(graph):
        edges[a].add(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer(graph: grimp.ImportGraph) -> None:
    for module in graph.modules:
        layer(module)


def upward_imports(graph: grimp.ImportGraph) -> list[str]:
    """Every import of a module in a higher layer, with the lines that make it."""
    return [
        f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)}): "
        + "; ".join(f"line {d['line_number']}: {d['line_contents']}"
                    for d in graph.get_import_details(importer=a, imported=b))
        for a, b in _edges(graph)
        if layer(b) > layer(a)
    ]


def test_imports_never_point_to_a_higher_layer(graph: grimp.ImportGraph) -> None:
    upward = upward_imports(graph)
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_no_import_cycle(graph: grimp.ImportGraph) -> None:
    assert _cycles(graph) == []


def test_no_cycle_joins_the_transport_and_the_application(graph: grimp.ImportGraph) -> None:
    # Implied by the two tests above; kept on its own because it is the rule the layers exist for.
    for cycle in _cycles(graph):
        transport = any(m.startswith("dmipro.executor_adapters") for m in cycle)
        above = any(m.startswith(("dmipro.tasks", "dmipro.teleprompt")) for m in cycle)
        assert not (transport and above), cycle


def test_the_checks_see_in_function_imports(graph: grimp.ImportGraph) -> None:
    # The CLI defers its imports to its commands: if grimp skipped function bodies this edge would vanish.
    assert "dmipro.jobs.submit" in graph.find_modules_directly_imported_by("dmipro.workers.cli")


def test_the_checks_fail_on_an_upward_import_and_a_cycle() -> None:
    # The old shape: the transport imported the task bodies, which imported the application.
    bad = grimp.ImportGraph()
    for a, b in (("dmipro.executor_adapters.base", "dmipro.tasks"),
                 ("dmipro.tasks", "dmipro.teleprompt.mipro"),
                 ("dmipro.teleprompt.mipro", "dmipro.evaluation"),
                 ("dmipro.evaluation", "dmipro.executor_adapters.base")):
        bad.add_import(importer=a, imported=b)
    assert len(upward_imports(bad)) == 2
    assert _cycles(bad) == [sorted(bad.modules)]
    assert layer("dmipro.jobs.submit") > layer("dmipro.jobs.runtime")
