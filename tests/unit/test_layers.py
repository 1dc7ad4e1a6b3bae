"""Imports only go downward: models ← library core ← engine ← HTTP door ← command lines.

Every import of every module is read (function-level ones included), so a shortcut upward shows up here
before it shows up as an import circle or a web framework inside the library.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Each layer and the layers of this project it may import (its own included).
ALLOWED: dict[str, set[str]] = {
    "models": {"models"},
    "service.core": {"models", "service.core"},
    "service.metrics": {"service.core"},
    "service.engine": {"models", "service.core", "service.metrics", "service.engine"},
    "service.settings": {"models", "service.core", "service.engine"},
    "service.client": set(),
    "service.api": {"models", "service.core", "service.metrics", "service.engine", "service.settings", "service.api"},
    "service.bulk": {"models", "service.core", "service.settings", "service.client", "service.bulk"},
    "service.cli": {"models", "service.core", "service.settings", "service.api", "service.bulk", "evaluation"},
    "service.testing": set(),
    "service.hostile": set(),
    "evaluation": {"models", "service.core", "evaluation", "service.client", "service.testing"},
}
WEB_FRAMEWORKS = {"fastapi", "starlette", "uvicorn"}


def layer_of(module: str) -> str | None:
    for layer in sorted(ALLOWED, key=len, reverse=True):
        if module == layer or module.startswith(layer + "."):
            return layer
    return None


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def modules() -> list[tuple[str, Path]]:
    out = []
    for package in ("models", "service", "evaluation"):
        for path in sorted((REPO / package).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            out.append((name, path))
    return out


@pytest.mark.parametrize(("name", "path"), modules(), ids=[name for name, _ in modules()])
def test_imports_go_downward(name: str, path: Path) -> None:
    layer = layer_of(name)
    if layer is None:  # service/__init__.py, service/__main__.py: the package's entry points
        return
    upward = {module for module in imports(path)
              if (target := layer_of(module)) is not None and target not in ALLOWED[layer]}
    assert not upward, f"{name} ({layer}) imports {sorted(upward)}: only {sorted(ALLOWED[layer])} are below it"
    if layer in ("models", "service.core", "service.engine", "evaluation", "service.client"):
        web = {module for module in imports(path) if module.split(".")[0] in WEB_FRAMEWORKS}
        assert not web, f"{name} is below the HTTP door but imports {sorted(web)}"


def test_every_module_belongs_to_a_layer() -> None:
    loose = [name for name, _ in modules() if layer_of(name) is None and name not in ("service", "service.__main__")]
    assert not loose, f"modules outside every layer (add them to ALLOWED): {loose}"


def project_imports(path: Path, known: set[str]) -> set[str]:
    """The project's modules `path` imports: `from package import name` counts as importing the module
    `package.name` when that is one (else the package), so a circle through a package's modules shows."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & known
            found |= submodules or {node.module}
    return found & known


def import_cycles() -> list[list[str]]:
    """Every strongly connected group of two or more modules in the import graph (Tarjan's algorithm)."""
    paths = dict(modules())
    graph = {name: sorted(project_imports(path, set(paths)) - {name}) for name, path in paths.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for name in graph:
        if name not in index:
            visit(name)
    return cycles


def test_no_import_cycles() -> None:
    """No module reaches itself through the imports of others, however long the way (function-level and
    TYPE_CHECKING imports count: a circle hidden in a function is still a circle)."""
    assert import_cycles() == []
