"""No module imports from a package above it (the layer table in ARCHITECTURE.md), and the house stays small."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "cmkit"
LAYERS = {"core": 1, "models": 2, "latent": 2, "solvers": 3, "objectives": 4, "training": 5, "sampling": 5, "data": 6,
          "eval": 6,
          "cli": 7}
TOP = 8  # cmkit/__init__.py and __main__.py re-export and run everything


def _package(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else "__top__"


def _imported_packages(path: Path, source: str | None = None):
    """The cmkit packages a module imports (relative imports resolved against its own package); ``source``: the
    module's text, where it is not the file's."""
    me = _package(path)
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and (node.module or "").startswith("cmkit."):
                yield node.module.split(".")[1]
            elif node.level == 1 and me != "__top__":
                yield me
            elif node.level == 1:
                yield from ([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
            elif node.level == 2:
                yield from ([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("cmkit."):
                    yield a.name.split(".")[1]


def test_every_module_lives_in_a_layer():
    strays = [p.relative_to(PKG).as_posix() for p in PKG.rglob("*.py") if _package(p) not in {*LAYERS, "__top__"}]
    tops = {p.name for p in PKG.glob("*.py")}
    assert not strays, strays
    assert tops == {"__init__.py", "__main__.py"}, tops


def test_no_module_imports_from_above():
    bad = []
    for path in PKG.rglob("*.py"):
        pkg = _package(path)
        me = TOP if pkg == "__top__" else LAYERS[pkg]
        for dep in _imported_packages(path):
            if LAYERS.get(dep, 0) > me:
                bad.append(f"{path.relative_to(PKG)} (layer {me}) imports cmkit.{dep} (layer {LAYERS[dep]})")
    assert not bad, bad


def test_the_checker_catches_an_upward_import(tmp_path, monkeypatch):
    """A model module importing the trainer must be reported (the test above would pass vacuously otherwise)."""
    fake = PKG / "models" / "_upward_probe.py"  # never written: a worker killed mid-test would leave it in the tree
    found = set(_imported_packages(fake, "from ..training import train\n"))
    assert found == {"training"} and LAYERS["training"] > LAYERS[_package(fake)]


def test_no_library_function_is_longer_than_a_screen():
    long = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 60:
                    long.append(f"{path.relative_to(PKG)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long
