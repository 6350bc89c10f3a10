"""No module imports from a package above it (the layer table in ARCHITECTURE.md), and the house stays small."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "cmkit"
LAYERS = {"core": 1, "models": 2, "data": 2, "latent": 3, "solvers": 3, "loading": 4, "objectives": 5, "training": 6,
          "sampling": 6, "eval": 7, "cli": 8}
TOP = 9  # cmkit/__init__.py and __main__.py re-export and run everything


def _package(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else "__top__"


def _imported_packages(path: Path, source: str | None = None):
    """The cmkit subpackages a module imports, every relative import resolved against the module's own package
    (``from ...core import x`` in ``cmkit/latent/families/sd3.py`` is ``cmkit.core``); ``source``: the module's
    text, where it is not the file's."""
    here = list(path.relative_to(PKG).parent.parts)  # the module's package below cmkit ([] for cmkit itself)
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] == "cmkit" and len(parts) > 1:
                    yield parts[1]
                continue
            if node.level - 1 > len(here):
                raise AssertionError(f"{path}: a relative import beyond the cmkit package")
            base = here[:len(here) - (node.level - 1)]
            target = base + (node.module.split(".") if node.module else [])
            if target:
                yield target[0]
            else:  # ``from . import x`` in cmkit/__init__.py: x is a subpackage
                yield from (a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("cmkit."):
                    yield a.name.split(".")[1]


def _upward(path: Path, source: str | None = None) -> list[str]:
    pkg = _package(path)
    me = TOP if pkg == "__top__" else LAYERS[pkg]
    return [f"{path.relative_to(PKG)} (layer {me}) imports cmkit.{dep} (layer {LAYERS[dep]})"
            for dep in _imported_packages(path, source) if LAYERS.get(dep, 0) > me]


def test_every_module_lives_in_a_layer():
    strays = [p.relative_to(PKG).as_posix() for p in PKG.rglob("*.py") if _package(p) not in {*LAYERS, "__top__"}]
    tops = {p.name for p in PKG.glob("*.py")}
    assert not strays, strays
    assert tops == {"__init__.py", "__main__.py"}, tops
    assert set(LAYERS) == {p.name for p in PKG.iterdir() if (p / "__init__.py").is_file()}


def test_no_module_imports_from_above():
    bad = [line for path in PKG.rglob("*.py") for line in _upward(path)]
    assert not bad, bad


def _folders():
    return sorted({p.parent for p in PKG.rglob("*.py") if p.parent != PKG})


@pytest.mark.parametrize("folder", _folders(), ids=lambda f: f.relative_to(PKG).as_posix())
def test_the_checker_catches_an_upward_import_in_every_folder(folder):
    """In every folder (``latent/families/`` included), an import of the top layer (cli) is reported in each
    relative form that reaches it and in the absolute one (the test above would pass vacuously otherwise), and
    an import of its own package or of core is not. The probe module is never written: a worker killed mid-test
    would leave it in the tree."""
    probe = folder / "_upward_probe.py"
    depth = len(probe.relative_to(PKG).parts) - 1  # the dots that reach cmkit itself, minus one
    up = "." * (depth + 1)
    own = _package(probe)
    for planted in (f"from {up}cli import main\n", f"from {up}cli.commands import main\n",
                    "from cmkit.cli import main\n", "import cmkit.cli.commands\n"):
        found = _upward(probe, planted) if own != "cli" else ["cli imports itself"]
        assert found, (folder, planted)
    for harmless in (f"from {up}core import Registry\n", "from . import x\n", f"from {up}{own} import y\n"):
        assert not _upward(probe, harmless), (folder, harmless)


def test_no_library_function_is_longer_than_a_screen():
    long = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 60:
                    long.append(f"{path.relative_to(PKG)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long
