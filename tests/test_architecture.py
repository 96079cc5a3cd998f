"""The layering holds: imports run one way (core -> kernels -> schedulers -> pipelines -> methods -> training -> cli),
``gensample.core`` imports nothing of gensample outside itself, and no two modules import each other in a circle.

The import graph is read from the source (ast), counting function-level imports too, so a deferred import cannot
hide a cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["core", "kernels", "schedulers", "pipelines", "methods", "training", "cli"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "pipelines":  # installed as gensample.pipelines
        parts = ["gensample"] + parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    files = [p for d in ("gensample", "pipelines") for p in (ROOT / d).rglob("*.py")]
    modules = {module_name(p): p for p in files}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # ``from pkg import mod`` is an edge to pkg.mod; ``from mod import name`` an edge to mod
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                # the longest known module that the target names (a name imported from a package is not a module)
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm; components with more than one module are import cycles."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return [c for c in out if len(c) > 1]


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_graph_reader_sees_a_known_edge():
    graph = import_graph()
    assert "gensample.core.sigmas" in graph["gensample.core.parametrization"]
    assert "gensample.core.parametrization" in graph["gensample.schedulers.scheduling_consistency"]


def test_no_import_cycles():
    cycles = strongly_connected(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_core_imports_nothing_else_of_gensample():
    graph = import_graph()
    bad = [(m, t) for m, targets in graph.items() if m.startswith("gensample.core")
           for t in targets if t.startswith("gensample") and not t.startswith("gensample.core")]
    assert not bad, f"gensample.core must import only torch/numpy/math: {bad}"


def test_layers_import_downwards_only():
    graph = import_graph()
    upward = [(m, t) for m, targets in graph.items() for t in targets
              if layer(m) is not None and layer(t) is not None and layer(t) > layer(m)]
    assert not upward, "imports against the layering (core -> kernels -> schedulers -> pipelines -> methods -> " \
                       f"training -> cli): {upward}"


def test_strongly_connected_finds_a_cycle():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
