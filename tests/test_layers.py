"""The library's layers: who may import whom (docs/architecture.md), and the library never imports its CLIs."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "car_med"

#: a subpackage (or top-level module) of car_med may import only those of a lower rank
LAYERS = {
    "files": 0,
    "ct": 0,
    "components": 0,
    "hypotheses": 0,
    "data": 1,
    "visualize": 2,
    "losses": 2,
    "networks": 2,
    "sampling": 2,
    "metrics": 3,
    "engines": 3,
    "registry": 3,
    "evaluation": 4,
    "handlers": 5,
    "export": 5,
    "blackbox": 5,
    "experiments": 6,
    "predict": 6,
}


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts != ("__init__",):
            out.append((parts[0], path))
    return out


def test_the_library_never_imports_preprocessing():
    offenders = [
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for _, path in _modules()
        for name in _imports(path)
        if name == "preprocessing" or name.startswith("preprocessing.")
    ]
    assert not offenders, offenders


def test_every_import_goes_down_the_layers():
    modules = _modules()
    assert {layer for layer, _ in modules} == set(LAYERS), "a new subpackage needs a place in LAYERS and the docs"
    upward = []
    for layer, path in modules:
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] != "car_med" or len(parts) < 2 or parts[1] == layer:
                continue
            if LAYERS[parts[1]] >= LAYERS[layer]:
                upward.append(f"{path.relative_to(PACKAGE.parent)} ({layer}) imports {name}")
    assert not upward, upward
