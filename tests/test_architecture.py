"""Architecture rules that a test can hold, on the source of ``llmsample/``.

- No private name crosses a module boundary: a name with a leading underscore is its
  module's own business (no ``from a import _x``, no ``import a; a._x``).
- Boundaries: only ``hf/`` imports transformers or peft; only ``vllm/`` imports vLLM
  (imports inside functions count).
- No import cycles between modules, function-level imports included (a cycle hidden in a
  function is still two modules that need each other).
- Scripts in ``recipes/`` and ``benchmarks/`` never edit ``sys.path``: what they share with
  the evals is in the package (``llmsample.data.tasks``), and a sibling script is imported
  from the script's own folder, which Python puts first on ``sys.path``.
"""

import ast
from pathlib import Path

import pytest

import llmsample

ROOT = Path(llmsample.__file__).resolve().parent


def _private_crossings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found, imported = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("llmsample"):
            for alias in node.names:
                imported.add(alias.asname or alias.name)
                if alias.name.startswith("_"):
                    found.append(f"{path.name}:{node.lineno} imports {node.module}.{alias.name}")
        elif isinstance(node, ast.Import):  # import llmsample.x as y: y._z is a crossing
            imported.update(
                (a.asname or a.name).split(".")[0]
                for a in node.names
                if a.name.startswith("llmsample")
            )
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and isinstance(node.value, ast.Name)
            and node.value.id in imported
        ):
            found.append(f"{path.name}:{node.lineno} uses {node.value.id}.{node.attr}")
    return found


def test_no_private_name_is_imported_across_modules():
    files = sorted(ROOT.rglob("*.py"))
    assert len(files) > 30  # the whole package is scanned
    crossings = [c for f in files for c in _private_crossings(f)]
    assert crossings == []


def test_the_checker_sees_both_forms(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from llmsample.generate import _x\nimport llmsample.smc.engine as e\ne._y\n"
        "import sys\nsys._getframe\n"  # private names of other libraries are not ours
    )
    assert _private_crossings(bad) == [
        "bad.py:1 imports llmsample.generate._x",
        "bad.py:3 uses e._y",
    ]


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every module ``path`` imports (anywhere in the file), with the line."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module, node.lineno))
            # `from llmsample.x import y` may import the submodule llmsample.x.y
            out += [(f"{node.module}.{a.name}", node.lineno) for a in node.names]
    return out


BOUNDARIES = {"transformers": "llmsample.hf", "peft": "llmsample.hf", "vllm": "llmsample.vllm"}


@pytest.mark.parametrize("library", sorted(BOUNDARIES))
def test_only_the_boundary_package_imports_the_library(library):
    home = BOUNDARIES[library]
    leaks = [
        f"{_module(f)}:{line} imports {name}"
        for f in sorted(ROOT.rglob("*.py"))
        for name, line in _imports(f)
        if name.split(".")[0] == library and not _module(f).startswith(home)
    ]
    assert leaks == []


def _graph() -> dict[str, set[str]]:
    modules = {_module(f): f for f in ROOT.rglob("*.py")}
    graph = {m: set() for m in modules}
    for m, f in modules.items():
        for name, _ in _imports(f):
            if name in modules and name not in (m, "llmsample"):
                graph[m].add(name)  # (`import llmsample` reaches the public API: not counted)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_hidden_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def _sys_path_edits(source: str, name: str) -> list[str]:
    """Every line of ``source`` that changes the import path: a call or an assignment on
    ``sys.path`` (``sys.path.insert(...)``, ``sys.path[:0] = ...``), ``from sys import path``
    and ``site.addsitedir``."""

    def is_sys_path(node) -> bool:
        while isinstance(node, (ast.Attribute, ast.Subscript)):
            if (
                isinstance(node, ast.Attribute)
                and node.attr == "path"
                and isinstance(node.value, ast.Name)
                and node.value.id == "sys"
            ):
                return True
            node = node.value
        return False

    lines = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if is_sys_path(node.func.value) or node.func.attr == "addsitedir":
                lines.add(node.lineno)
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            if any(is_sys_path(t) for t in targets):
                lines.add(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "sys":
            if any(a.name == "path" for a in node.names):
                lines.add(node.lineno)
    return [f"{name}:{line}" for line in sorted(lines)]


def test_no_recipe_or_benchmark_edits_sys_path():
    bad = (
        "import sys, site\nsys.path.insert(0, 'x')\nsys.path.append('x')\n"
        "sys.path[:0] = ['x']\nsys.path += ['x']\nsite.addsitedir('x')\n"
        "from sys import path\nprint(sys.path)\nsys.argv.append('x')\n"
    )
    assert _sys_path_edits(bad, "bad.py") == [f"bad.py:{i}" for i in range(2, 8)]
    repo = ROOT.parent
    files = sorted((repo / "recipes").rglob("*.py")) + sorted((repo / "benchmarks").rglob("*.py"))
    assert len(files) >= 8  # both folders are scanned
    edits = [e for f in files for e in _sys_path_edits(f.read_text(), str(f.relative_to(repo)))]
    assert edits == []
