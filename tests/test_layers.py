"""The package layout is a stack: each layer imports only the layers below it, and no module imports itself
back through others, not even lazily inside a function (a cycle). Read from the source with ``ast``: nothing is
imported to check it (imports under ``if TYPE_CHECKING:`` do not count)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Bottom to top. A module may import its own layer and those listed before it.
LAYERS = ("deepeyes_envs", "deepeyes_agent.settings", "deepeyes_agent.run_records", "deepeyes_agent.policy", "deepeyes_agent.rollout",
          "deepeyes_agent.training", "deepeyes_agent.offline")
ENV_FORBIDDEN = ("torch", "transformers", "ray", "deepeyes_agent")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> dict[str, bool]:
    """Absolute names of the modules ``path`` imports -> whether at module level (not inside a function)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    type_only = {id(n) for node in tree.body if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                 for n in ast.walk(node)}
    found: dict[str, bool] = {}
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names]  # a submodule, or a name in ``base``
        else:
            continue
        for name in names:
            found[name] = found.get(name, False) or id(node) in top_level
    return found


def layer_of(name: str) -> int | None:
    matches = [i for i, layer in enumerate(LAYERS) if name == layer or name.startswith(layer + ".")]
    return max(matches) if matches else None


SOURCES = sorted(p for package in ("deepeyes_envs", "deepeyes_agent") for p in (ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_a_layer_above_it(path: Path):
    own = layer_of(module_name(path))
    above = sorted(name for name in imports(path) if (layer_of(name) or 0) > (own or 0))
    assert not above, f"{module_name(path)} (layer {LAYERS[own or 0]}) imports from above: {above}"
    if module_name(path).startswith("deepeyes_envs"):
        heavy = sorted(n for n in imports(path) if n.split(".")[0] in ENV_FORBIDDEN)
        assert not heavy, f"deepeyes_envs must stay torch-free: {module_name(path)} imports {heavy}"


def test_no_import_cycle():
    modules = {module_name(p): p for p in SOURCES}

    def resolve(imported: str) -> str:  # ``from pkg import name``: the submodule pkg.name, else pkg itself
        return imported if imported in modules else imported.rpartition(".")[0]

    graph = {name: {resolve(dep) for dep in imports(path) if resolve(dep) in modules} - {name}
             for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycle = trail[trail.index(dep):] + [dep] if dep in trail else [name, dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, trail + [dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
