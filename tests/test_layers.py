"""The library is config-free: its packages never import the config layer or omegaconf, and the
layers import only downwards (errors <- data, losses <- models <- training)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dpokit"
# package -> the dpokit packages it may import
ALLOWED = {
    "losses": {"errors", "losses"},
    "data": {"errors", "data", "losses"},
    "models": {"errors", "models", "losses", "data"},
    "training": {"errors", "training", "models", "losses", "data"},
}


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_library_packages_import_no_config_and_only_lower_layers(package):
    for path in sorted((PACKAGE / package).rglob("*.py")):
        for name in imports(path):
            top = name.split(".")[0]
            assert top != "omegaconf", f"{path}: imports omegaconf"
            if top == "dpokit":
                layer = name.split(".")[1] if "." in name else ""
                assert layer in ALLOWED[package], f"{path}: imports {name} ({package} may import {ALLOWED[package]})"
