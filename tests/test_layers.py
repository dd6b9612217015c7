"""The library is config-free: its packages never import the config layer or omegaconf, and the
layers import only downwards (errors, fileio <- logprobs, losses <- data <- models <- generation, distributed <- training)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dpokit"
# package -> the dpokit packages it may import
ALLOWED = {
    "logprobs": {"errors", "logprobs"},
    "losses": {"errors", "losses"},
    "data": {"errors", "fileio", "data", "logprobs"},
    "models": {"errors", "fileio", "models", "logprobs", "data"},
    "generation": {"errors", "generation", "models", "data"},
    "distributed": {"errors", "fileio", "distributed", "models", "logprobs", "losses", "data"},
    "training": {"errors", "fileio", "training", "distributed", "generation", "models", "logprobs", "losses", "data"},
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


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycle_between_library_modules():
    """Module-level and function-level imports alike (a deferred import hides a cycle, it does not
    remove it); package __init__ files only re-export and are left out."""
    modules = {
        module_name(p): p for layer in ALLOWED for p in (PACKAGE / layer).rglob("*.py") if p.name != "__init__.py"
    }
    graph = {name: {m for m in imports(path) if m in modules and m != name} for name, path in modules.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            assert state.get(target) != 1, "import cycle: " + " -> ".join(path[path.index(target) :] + [target])
            if target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_every_library_package_is_in_the_distribution():
    """pyproject.toml lists packages by name (recipes/ is mapped to dpokit.recipes): a package
    folder missing from the list would be absent from a wheel while an editable install hides it."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {"dpokit"} | {f"dpokit.{p.parent.name}" for p in PACKAGE.glob("*/__init__.py")}
    assert folders <= listed, f"not in pyproject.toml's packages: {sorted(folders - listed)}"
