"""The module graph: registries and the modules every reader needs are leaves, and modules do not import each other
in a circle (which makes the order of imports matter and registration by import fragile)."""

from __future__ import annotations

import ast
from pathlib import Path

import drbench

PACKAGE = Path(drbench.__file__).resolve().parent

LEAVES = {
    "drbench.record": set(),
    "drbench.safe_yaml": set(),
    "drbench.textsafe": set(),
    "drbench.stats": set(),
    "drbench.config": {"drbench.record"},
    "drbench.metric_registry": {"drbench.config", "drbench.stats"},
    "drbench.ops.region_conv_base": set(),
    "drbench.measure.allocator": set(),
}
"""Module -> the only drbench modules it may import at its top level."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each drbench module -> the drbench modules it imports at its top level (not in functions or type checks)."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module:
                imported |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
        graph[name] = {other for other in imported if other in modules and other != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in graph[module]:
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = set()
            while (top := stack.pop()) != module:
                component.add(top)
            component.add(module)
            if len(component) > 1:
                found.append(component)

    for module in graph:
        if module not in index:
            visit(module)
    return found


def test_leaves_import_only_what_they_are_allowed():
    graph = import_graph()
    assert {name: graph[name] - allowed for name, allowed in LEAVES.items() if graph[name] - allowed} == {}


def test_no_import_cycles():
    assert cycles(import_graph()) == []
