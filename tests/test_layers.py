"""No module imports from a layer above it (the house in DESIGN.md)."""

import ast
from pathlib import Path

LAYERS = {
    "sigmas": 1,
    "nets": 2, "denoisers": 2, "artefacts": 2,
    "ode": 3, "consistency": 3,
    "losses": 4, "objectives": 4,
    "training": 5, "checkpoints": 5, "sampling": 5, "editing": 5,
    "data": 6, "metrics": 6, "fidelity": 6, "classifier": 6, "schedules": 6, "bench": 6, "imageio": 6, "recipes": 6,
    "runs": 6, "quickstart": 6, "cli": 6, "__main__": 7, "__init__": 7,
}
PKG = Path(__file__).resolve().parents[1] / "cmkit"


def test_every_module_has_a_layer():
    assert {p.stem for p in PKG.glob("*.py")} == set(LAYERS)


def test_no_module_imports_from_above():
    bad = []
    for path in PKG.glob("*.py"):
        me = LAYERS[path.stem]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module] if node.module else [a.name for a in node.names]
                for name in names:
                    dep = name.split(".")[0]
                    if LAYERS.get(dep, 0) > me:
                        bad.append(f"{path.name} (layer {me}) imports {dep} (layer {LAYERS[dep]})")
    assert not bad, bad
