"""Imports inside src/loraq run one way: no module imports, directly or through others, one that
imports it back, and no package imports one on its own or a higher floor of :data:`FLOORS`.
The graph is read from the source with ``ast`` (every ``import`` statement, including those
inside functions), so a lazy import cannot hide a cycle or an upward import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from torch import nn

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "loraq"

# The floors of the house, lowest first. A module may import modules of its own package and of
# packages on lower floors only: never a higher floor, nor a sibling on its own floor (batching
# and io, the two users of model, stay independent; so do train and serve). eval scores a model
# it is handed and imports neither; train runs its tasks during training, so eval sits a floor
# below them. compare runs training (it imports train), so it sits a floor above it. "loraq" is the package's
# __init__, the public names; it and __main__ sit above the CLI.
FLOORS: list[set[str]] = [
    {"core"},
    {"native"},
    {"quant"},
    {"layers"},
    {"model"},
    {"batching", "io"},
    {"generation"},
    {"eval"},
    {"train", "serve"},
    {"compare"},
    {"cli"},
    {"loraq", "__main__"},
]


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


def package_graph(root: Path) -> dict[str, set[str]]:
    """``{module: modules it imports}`` with package ``__init__`` modules as targets too, so that
    ``from ..io import load_adapter`` counts as an import of ``io``."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        graph[name] = imported_modules(tree, name, path.name == "__init__.py", set(files))
    return graph


def room(module: str) -> str:
    """The package of ``loraq.<package>.<module>`` (``cli``, ``__main__`` or ``loraq`` at the root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def floor_breaches(graph: dict[str, set[str]], floors: list[set[str]]) -> list[tuple[str, str]]:
    """``(importer, imported)`` for each import of a module on the importer's floor (another
    package) or above it. A package missing from ``floors`` is an error: place it first."""
    level = {name: i for i, floor in enumerate(floors) for name in floor}
    unplaced = sorted({room(m) for m in graph} - set(level))
    if unplaced:
        raise ValueError(f"packages on no floor of FLOORS: {unplaced}")
    breaches = []
    for module, imported in sorted(graph.items()):
        for target in sorted(imported):
            here, there = room(module), room(target)
            if here != there and level[there] >= level[here]:
                breaches.append((module, target))
    return breaches


def test_floor_check_finds_upward_and_sideways_imports_in_a_synthetic_graph() -> None:
    floors = [{"core"}, {"io", "batching"}, {"serve"}]
    graph = {
        "loraq.core.a": {"loraq.core.b"},  # within a package: allowed
        "loraq.core.b": set(),
        "loraq.io.x": {"loraq.core.a", "loraq.batching"},  # down: fine; sideways: breach
        "loraq.batching": {"loraq.serve.s"},  # upward, from a package __init__
        "loraq.serve.s": {"loraq.io.x", "loraq.core.b"},
    }
    assert floor_breaches(graph, floors) == [
        ("loraq.batching", "loraq.serve.s"),
        ("loraq.io.x", "loraq.batching"),
    ]
    with pytest.raises(ValueError, match=r"no floor of FLOORS: \['train'\]"):
        floor_breaches({"loraq.train.t": set()}, floors)


def test_loraq_imports_run_down_the_floors() -> None:
    graph = package_graph(PACKAGE)
    assert "loraq.io" in graph["loraq"], "package re-exports were not read"
    breaches = floor_breaches(graph, FLOORS)
    assert not breaches, f"imports that do not run down FLOORS: {breaches}"


def test_nothing_outside_layers_calls_a_private_lora_layer_member() -> None:
    # LoRALayer's users go through its public view (adapter_view, row_hook, adapter_version).
    source = (PACKAGE / "layers" / "lora.py").read_text(encoding="utf-8")
    cls = next(
        node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ClassDef) and node.name == "LoRALayer"
    )
    private = {
        node.attr if isinstance(node, ast.Attribute) else node.name
        for node in ast.walk(cls)
        if isinstance(node, ast.FunctionDef)
        or (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name))
        and node.value.id == "self"
    }
    inherited = set(dir(nn.Module()))  # nn.Module's own members (_modules, ...) are not LoRALayer's
    private = {n for n in private if n.startswith("_") and not n.startswith("__")} - inherited
    assert {"_a_b_params", "_dropout_p", "_adapter_version"} <= private
    users = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name == "layers":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in private:
                users.append(f"{path.relative_to(PACKAGE)}:{node.lineno} .{node.attr}")
            if isinstance(node, ast.Constant) and node.value == "row_adapters":
                users.append(f"{path.relative_to(PACKAGE)}:{node.lineno} __dict__ side channel")
    assert not users, f"private LoRALayer members used outside layers/: {users}"


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
    found = sorted(sorted(c) for c in cycles(graph))
    assert not found, f"import cycles in src/loraq: {found}"
