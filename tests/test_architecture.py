"""Architecture rules that a test can hold: no private name crosses a module boundary.

Inside ``llmsample/``, a name with a leading underscore is that module's own business: no
other module imports it (``from a import _x``) or reaches for it (``import a; a._x``).
"""

import ast
from pathlib import Path

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
