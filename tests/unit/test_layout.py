"""The house's shape: every wing imports only downwards, and no module imports in a circle.

The order (bottom first) is the one docs/architecture.md draws. A new wing must be placed
here, which is the point: somebody decides where it sits before it grows.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "gateway"

#: bottom first; a module may import its own wing and any wing before it
LAYERS = [
    "gateway.config",
    "gateway.state",
    "gateway.mcp",
    "gateway.auth",
    "gateway.policy",
    "gateway.oauth",
    "gateway.ops",
    "gateway.vault",
    "gateway.assembly",
    "gateway.pipeline",
    "gateway.app",
    "gateway.serving",
    "gateway.explain",
    "gateway.dev",
    "gateway.cli",
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    for rank, wing in enumerate(LAYERS):
        if module == wing or module.startswith(wing + "."):
            return rank
    raise AssertionError(f"{module} belongs to no wing: add it to LAYERS and docs/architecture.md")


def _imports(path: Path) -> set[str]:
    """Every gateway module `path` imports, at module level or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("gateway"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gateway") and node.level == 0:
            for alias in node.names:  # `from gateway.mcp import jsonrpc` names a module
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py").exists() else node.module)
    return found


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "bundled" not in p.parts}
GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_only_downwards(module: str) -> None:
    upward = [dep for dep in sorted(GRAPH[module]) if dep != "gateway" and _layer(dep) > _layer(module)]
    assert not upward, f"{module} imports upwards: {upward}"


def test_no_import_cycles() -> None:
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(GRAPH.get(node, ())):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep] if dep in path else [node, dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep in GRAPH and state.get(dep) is None:
                visit(dep, path + [dep])
        state[node] = 2

    for module in sorted(GRAPH):
        if state.get(module) is None:
            visit(module, [module])


def test_the_layer_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The check itself can fail: an mcp module importing the request path is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("from gateway.pipeline import handle_mcp\n")
    assert _layer(next(iter(_imports(bad)))) > _layer("gateway.mcp.messages")
