"""The package's import graph, read from the source with ``ast``: no cycles (imports inside
functions count: a function-local import that dodges a cycle is still the cycle), and the layers
import downwards only (evaluation never imports training, distillation or the modes; only the
entry points import the modes)."""
from __future__ import annotations

import ast
import pathlib
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fdistill"


def module_files(package_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """Dotted module name -> file for every ``.py`` under ``package_dir`` (a package's name is
    its ``__init__.py``)."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _ancestors(name: str) -> list[str]:
    """``a.b.c`` -> ``['a', 'a.b']``: the packages Python initialises before ``name``."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imported_names(tree: ast.AST, name: str, is_package: bool) -> set[str]:
    """Every dotted name an ``import`` / ``from ... import`` anywhere in ``tree`` (module level,
    functions, classes, conditionals) imports, relative imports resolved, plus the candidates
    ``X.y`` of ``from X import y`` (kept when ``X.y`` is a module)."""
    package = name if is_package else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                if node.level - 1 >= len(base_parts):
                    raise ImportError(f"{name}: relative import beyond the top-level package")
                base = ".".join(base_parts[:len(base_parts) - (node.level - 1)])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(package_dir: pathlib.Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports. Importing ``p.q.r`` runs ``p.q``'s
    ``__init__`` first, so the packages above an imported module are edges too, except those
    that enclose the importer itself (already initialising when it runs)."""
    modules = module_files(package_dir)
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        own = set(_ancestors(name)) | {name}
        targets = set()
        for imported in _imported_names(tree, name, path.name == "__init__.py"):
            # ``import p.q.r`` of a name that is not a module (``from p import some_function``)
            # imports its longest module prefix.
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported:
                targets.update(m for m in _ancestors(imported) + [imported] if m in modules)
        graph[name] = targets - own
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle ``[a, b, ..., a]`` per strongly connected component with more than one module
    (Tarjan's algorithm; a module never imports itself here, see ``import_graph``)."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                components.append(set(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph, component: set[str]) -> list[str]:
    """A shortest cycle through the first module of a strongly connected component (BFS)."""
    start = min(component)
    parent, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]  # v back to start through the BFS parents
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])
                    return path[::-1] + [start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module that importing ``start`` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for w in graph.get(todo.pop(), ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def _format(cycles) -> str:
    return "import cycles:\n  " + "\n  ".join(" -> ".join(c) for c in cycles)


# ---------------------------------------------------------------------------------------------
# fdistill itself.

@pytest.fixture(scope="module")
def graph():
    return import_graph(PACKAGE)


def test_fdistill_has_no_import_cycles(graph):
    assert {"fdistill.modes", "fdistill.train", "fdistill.evaluation.scoring",
            "fdistill.models"} <= set(graph)
    assert "fdistill.train" in graph["fdistill.modes"]  # the graph is not empty by mistake
    cycles = find_cycles(graph)
    assert not cycles, _format(cycles)


def test_evaluation_never_imports_training_distillation_or_modes(graph):
    """Directly or through any other module."""
    forbidden = {"fdistill.train", "fdistill.distill", "fdistill.modes"}
    bad = {name: sorted(reachable(graph, name) & forbidden) for name in graph
           if name.startswith("fdistill.evaluation")}
    assert not {k: v for k, v in bad.items() if v}, bad


def test_only_the_entry_points_import_the_modes(graph):
    importers = {name for name, targets in graph.items() if "fdistill.modes" in targets}
    assert importers <= {"fdistill.main", "fdistill.quickstart"}, sorted(importers)
    assert "fdistill.main" in importers


# ---------------------------------------------------------------------------------------------
# The checker on synthetic packages.

def _package(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    for rel, source in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    return root / "pkg"


def test_a_cycle_through_a_function_local_import_is_found(tmp_path):
    pkg = _package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg import b\n",
        "pkg/b.py": """
            def late():
                from pkg.a import thing
                return thing
            """,
        "pkg/c.py": "import pkg.a\n",
    })
    g = import_graph(pkg)
    assert g == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.c": {"pkg.a"}}
    assert find_cycles(g) == [["pkg.a", "pkg.b", "pkg.a"]]
    assert "pkg.a -> pkg.b -> pkg.a" in _format(find_cycles(g))


def test_relative_imports_and_package_inits_make_edges(tmp_path):
    """``from . import x`` and ``from ..y import z`` resolve; importing ``pkg.sub.m`` runs
    ``pkg/sub/__init__.py``, which here imports back: a three-module cycle."""
    pkg = _package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/top.py": """
            class K:
                def f(self):
                    from .sub import m
            """,
        "pkg/sub/__init__.py": "from ..top import K\n",
        "pkg/sub/m.py": "from . import helper\n",
        "pkg/sub/helper.py": "import os\n",
    })
    g = import_graph(pkg)
    assert g["pkg.top"] == {"pkg.sub", "pkg.sub.m"}
    assert g["pkg.sub"] == {"pkg.top"}
    assert g["pkg.sub.m"] == {"pkg.sub.helper"}  # its own package is initialising already
    assert find_cycles(g) == [["pkg.sub", "pkg.top", "pkg.sub"]]


def test_a_package_importing_its_submodules_is_not_a_cycle(tmp_path):
    pkg = _package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/models/__init__.py": "from pkg.models.net import Net\nfrom pkg.models import layers\n",
        "pkg/models/net.py": "from pkg.models.layers import dense\n",
        "pkg/models/layers.py": "def dense():\n    pass\n",
        "pkg/use.py": "from pkg.models import Net\n",
    })
    g = import_graph(pkg)
    assert g["pkg.models"] == {"pkg.models.net", "pkg.models.layers"}
    assert g["pkg.use"] == {"pkg.models"}
    assert find_cycles(g) == []


def test_reachable_follows_imports_transitively(tmp_path):
    pkg = _package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/evaluation/__init__.py": "",
        "pkg/evaluation/score.py": "from pkg import util\n",
        "pkg/util.py": "def f():\n    import pkg.train\n",
        "pkg/train.py": "",
    })
    g = import_graph(pkg)
    assert "pkg.train" in reachable(g, "pkg.evaluation.score")
    assert reachable(g, "pkg.train") == set()
