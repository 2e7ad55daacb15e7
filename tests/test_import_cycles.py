"""No import cycle between edgeq's modules.

Every import statement counts, at module level or inside a function: an import deferred into a function still
makes the two modules depend on each other, it only hides the cycle from Python until that function runs.
``from edgeq.pkg import name`` points at ``edgeq.pkg.name`` when that is a module, else at ``edgeq.pkg``. The parent
packages Python initialises on the way to a submodule are not edges: a package's ``__init__`` re-exporting its
own submodules would otherwise be a cycle with each of them.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "edgeq"


def edgeq_modules(root: Path = PACKAGE_ROOT) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, whether it is a package's ``__init__``)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def _imported_names(tree: ast.AST, package: str):
    """(dotted name, line) for every name an import statement in ``tree`` brings in, relative ones made absolute."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                yield f"{base}.{alias.name}", node.lineno


def import_graph(modules: dict[str, tuple[Path, bool]]) -> dict[str, dict[str, int]]:
    """module -> {edgeq module it imports: line of the first such import}."""
    def owning_module(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, int]] = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        edges: dict[str, int] = {}
        for imported, line in _imported_names(ast.parse(path.read_text(), str(path)), package):
            target = owning_module(imported)
            if target is not None and target != name:
                edges.setdefault(target, line)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, modules and edges in sorted order)."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(module: str) -> list[str] | None:
        path.append(module)
        on_path.add(module)
        for target in sorted(graph[module]):
            if target in on_path:
                return path[path.index(target):] + [target]
            if target not in done:
                found = visit(target)
                if found:
                    return found
        on_path.discard(path.pop())
        done.add(module)
        return None

    for module in sorted(graph):
        if module not in done:
            found = visit(module)
            if found:
                return found
    return None


def describe_cycle(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    return "\n".join(f"  {a} (line {graph[a][b]}) -> {b}" for a, b in zip(cycle, cycle[1:]))


def test_edgeq_has_no_import_cycle():
    graph = import_graph(edgeq_modules())
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle:\n" + describe_cycle(cycle, graph)


def test_a_function_level_import_closing_a_loop_is_a_cycle(tmp_path):
    package = tmp_path / "edgeq"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from .low import helper\n")
    (package / "sub" / "low.py").write_text("def helper():\n    from edgeq import top\n")
    (package / "top.py").write_text("from edgeq.sub import low\n")
    graph = import_graph(edgeq_modules(package))
    assert graph["edgeq.sub"] == {"edgeq.sub.low": 1}
    assert find_cycle(graph) == ["edgeq.sub.low", "edgeq.top", "edgeq.sub.low"]
    assert "edgeq.sub.low (line 2) -> edgeq.top" in describe_cycle(find_cycle(graph), graph)


def test_a_package_reexporting_its_submodules_is_no_cycle(tmp_path):
    package = tmp_path / "edgeq"
    package.mkdir()
    (package / "__init__.py").write_text("from edgeq.a import f\nfrom . import b\n")
    (package / "a.py").write_text("from edgeq.b import g\ndef f():\n    pass\n")
    (package / "b.py").write_text("def g():\n    pass\n")
    graph = import_graph(edgeq_modules(package))
    assert graph == {"edgeq": {"edgeq.a": 1, "edgeq.b": 2}, "edgeq.a": {"edgeq.b": 1}, "edgeq.b": {}}
    assert find_cycle(graph) is None
