"""Imports inside src/loraq run one way: no module imports, directly or through others, one that
imports it back. The graph is read from the source with ``ast`` (every ``import`` statement,
including those inside functions), so a lazy import cannot hide a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "loraq"

# Cycles tolerated while work in progress removes them, each the set of a cycle's modules, with a
# comment saying who removes it. Empty: src/loraq has no import cycle.
KNOWN_CYCLES: set[frozenset[str]] = set()


def module_name(path: Path, root: Path) -> str:
    """Dotted module name of ``path`` inside the package folder ``root``."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of ``known`` that the parsed source of ``module`` imports."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in candidates:
            # "import a.b.c" also runs a and a.b: count the deepest known module only.
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """``{module: modules it imports}`` for every module of the package at ``root``.

    Package ``__init__`` modules are left out as targets: importing ``loraq.layers.lora`` runs
    ``loraq/layers/__init__.py`` too, but re-exports there do not make a module depend on its
    siblings.
    """
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    packages = {module_name(p, root) for p in root.rglob("__init__.py")}
    targets = set(files) - packages
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        graph[name] = imported_modules(tree, name, path.name == "__init__.py", targets)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_detector_finds_cycles_in_a_synthetic_graph() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": set(), "f": {"f"}}
    assert cycles(graph) == [frozenset({"a", "b", "c"})]
    assert cycles({"x": {"y"}, "y": set()}) == []
    assert cycles({"x": {"y"}, "y": {"x"}}) == [frozenset({"x", "y"})]


def test_graph_reads_relative_lazy_and_package_imports(tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("from .a import f\n")
    (root / "a.py").write_text("def f():\n    from .sub import b\n    return b\n")
    (root / "sub" / "__init__.py").write_text("")
    (root / "sub" / "b.py").write_text("from ..a import f\nimport pkg.sub.c\n")
    (root / "sub" / "c.py").write_text("import os\n")
    graph = import_graph(root)
    assert graph["pkg.a"] == {"pkg.sub.b"}
    assert graph["pkg.sub.b"] == {"pkg.a", "pkg.sub.c"}
    assert graph["pkg"] == {"pkg.a"}
    assert cycles(graph) == [frozenset({"pkg.a", "pkg.sub.b"})]


def test_loraq_has_no_import_cycles() -> None:
    graph = import_graph(PACKAGE)
    assert "loraq.model.targeting" in graph and graph["loraq.model.surgery"], (
        "the graph was not read"
    )
    found = set(cycles(graph))
    unexpected = sorted(sorted(c) for c in found - KNOWN_CYCLES)
    assert not unexpected, f"import cycles in src/loraq: {unexpected}"


def test_known_cycles_are_still_there() -> None:
    # An allow-list entry for a cycle that is gone must be deleted, so it cannot hide a new one.
    stale = KNOWN_CYCLES - set(cycles(import_graph(PACKAGE)))
    assert not stale, f"remove these from KNOWN_CYCLES, they no longer exist: {stale}"
