"""kd's layers point one way: cli -> commands and stages -> engine -> methods/models/data/compress ->
registry/errors. Every import of a kd_cli module (at the top or inside a function) is read from the
source with `ast`; a module may import from its own layer or the ones below, never above, and no
group of modules imports itself round in a cycle. A new top-level module must be given a layer here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "kd_cli"

# Top to bottom. A name is a top-level module or package of kd_cli; "" is the package root (its version).
LAYERS: list[tuple[str, ...]] = [
    ("cli", "__main__"),
    ("stages", "commands", "config", "model_index"),
    ("engine",),
    ("methods", "models", "data", "compress", "tasks"),
    ("registry", "errors", "hydra_errors", "saved_forms", "overrides", "console", ""),
]
LEVEL = {name: level for level, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every kd_cli module `path` imports, wherever the import statement is."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package up
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES)
    return {m for m in found if m == "kd_cli" or m.startswith("kd_cli.")}


def top(module: str) -> str:
    """kd_cli.engine.loop -> engine; kd_cli -> "" (the package root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{source} imports {target} ({top(source) or 'kd_cli'} is below {top(target) or 'kd_cli'})"
        for source, targets in edges.items()
        for target in targets
        if LEVEL[top(target)] < LEVEL[top(source)]
    )


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), i.e. the import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in edges.get(node, ()):
                found.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))
MODULES = {module_name(path) for path in SOURCES}
EDGES = {module_name(path): imports_of(path) - {module_name(path)} for path in SOURCES}


def test_every_module_has_a_layer():
    unplaced = sorted({top(m) for m in MODULES} - set(LEVEL))
    assert not unplaced, f"give these kd_cli modules a layer in LAYERS: {unplaced}"


def test_no_module_imports_from_a_layer_above_it():
    assert upward_imports(EDGES) == []


def test_kd_cli_has_no_import_cycles():
    assert cycles(EDGES) == []


@pytest.mark.parametrize(
    ("source", "target"),
    [
        ("kd_cli.engine.loop", "kd_cli.stages.common"),  # engine reaching up to a stage
        ("kd_cli.methods.kd", "kd_cli.engine.artifacts"),
        ("kd_cli.errors", "kd_cli.models"),
        ("kd_cli.compress.lowrank", "kd_cli.cli"),
    ],
)
def test_an_upward_import_is_found(source, target):
    edges = {**EDGES, source: EDGES[source] | {target}}
    assert [line for line in upward_imports(edges) if line.startswith(f"{source} imports {target}")]


def test_a_cycle_is_found():
    edges = {**EDGES, "kd_cli.methods.logit_utils": EDGES["kd_cli.methods.logit_utils"] | {"kd_cli.methods.kd"}}
    assert any({"kd_cli.methods.kd", "kd_cli.methods.logit_utils"} <= set(group) for group in cycles(edges))


def test_imports_are_read_wherever_they_are(tmp_path):
    """Imports inside functions count too: a lazy import is still a dependency."""
    source = PACKAGE / "engine" / "loop.py"
    assert "kd_cli.methods.base" in imports_of(source)
    lazy = [m for m in EDGES["kd_cli.stages"] if m.startswith("kd_cli.stages.")]
    assert lazy, "kd_cli/stages/__init__.py imports its stage modules inside run(); they must be seen"
