"""No cycle in the module-level imports of ``pytest_incus`` and ``guest_agent``.

A cycle of module-level imports works only in the import order that happens to initialise its
modules in the right sequence; loaded in another order (a lazier ``__init__``, one subpackage
alone) it fails with "cannot import name ... from partially initialized module". The graph is
read from the source with ``ast``, so the test needs no import order of its own.

What counts as an edge from module M:
- every import statement that runs when M is imported: at module level, in module-level
  ``if``/``try``/``with`` blocks and class bodies; not in functions (they run later) and not
  under ``if TYPE_CHECKING:`` (it never runs);
- ``import a.b.c`` and ``from a.b import c`` import ``a.b.c`` and, since importing a submodule
  runs its parents' ``__init__`` first, ``a`` and ``a.b``; ``from a.b import name`` where
  ``name`` is a submodule imports that submodule too;
- except the packages that contain M itself: Python imports those before M, so importing M's
  names through them orders nothing (a package's ``__init__`` re-exporting its submodules
  would otherwise be a "cycle" with every one of them). A ``from P import name`` of M's own
  package P that takes a name defined in P (not a submodule) is an edge: that name may not
  exist yet while P's ``__init__`` is importing M.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pytest_incus", "guest_agent")


def module_files() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the project's packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _run_at_import(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements of ``body`` that run when the module is imported."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _run_at_import(node.body)
            yield from _run_at_import(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody):
                yield from _run_at_import(block)
            for handler in node.handlers:
                yield from _run_at_import(handler.body)
        elif isinstance(node, (ast.With, ast.ClassDef)):
            yield from _run_at_import(node.body)
        # functions (and their nested classes) run later, not at import


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imports_of(module: str, path: Path, modules: set[str]) -> set[str]:
    """The project modules that importing ``module`` imports (see the module docstring)."""
    is_package = path.name == "__init__.py"
    own = set(_parents(module)) | ({module} if is_package else set())
    package = module if is_package else module.rpartition(".")[0]
    targets: set[str] = set()  # named by the statement: always an edge
    implied: set[str] = set()  # parents run on the way: an edge unless M's own package
    for node in _run_at_import(ast.parse(path.read_text(), str(path)).body):
        if isinstance(node, ast.Import):
            for alias in node.names:
                targets.add(alias.name)
                implied.update(_parents(alias.name))
            continue
        if node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            source = ".".join([*base, *([node.module] if node.module else [])])
        else:
            source = node.module or ""
        implied.update(_parents(source))
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            if submodule in modules:
                targets.add(submodule)
                implied.add(source)
            else:
                targets.add(source)  # a name defined in ``source`` itself
    edges = targets | (implied - own)
    return {m for m in edges if m in modules and m != module}


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports at import time."""
    files = module_files()
    names = set(files)
    return {module: imports_of(module, path, names) for module, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan),
    each as a path that starts and ends at the same module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(graph, set(component)) for component in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the first module of ``component`` (breadth first)."""
    start = min(component)
    paths = {start: [start]}
    todo = [start]
    while todo:
        node = todo.pop(0)
        for succ in sorted(graph[node] & component):
            if succ == start:
                return [*paths[node], start]
            if succ not in paths:
                paths[succ] = [*paths[node], succ]
                todo.append(succ)
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def test_the_graph_sees_the_imports_it_should() -> None:
    graph = import_graph()
    # a plain module-level import, a submodule through "from package import name", and an
    # implied parent package that is not the importer's own
    assert "pytest_incus.errors" in graph["pytest_incus.spec"]
    assert "pytest_incus.fsutil" in graph["pytest_incus.registry"]
    assert "pytest_incus.images" in graph["pytest_incus.factory"]
    # the package that re-exports everything is imported by nobody inside it
    assert not any("pytest_incus" in deps for deps in graph.values())
    # guest_agent never imports pytest_incus
    for module, deps in graph.items():
        if module.startswith("guest_agent"):
            assert all(dep.startswith("guest_agent") for dep in deps), (module, deps)


def test_a_cycle_is_found_and_shown() -> None:
    graph = {"a": {"a.b"}, "a.b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "a.b", "c", "a"]]


def test_no_import_cycle() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in found)
