"""The package's import structure, read from the source with `ast` (nothing is imported):

    (a) nothing under moeco/model imports moeco.fp8 (precision reaches the model through a recipe);
    (b) no module imports another that imports it back, directly or through a cycle. Imports inside
        functions count: a lazy import hides a cycle, it does not remove it.
"""

import ast
from pathlib import Path

import moeco

SRC = Path(moeco.__file__).parent  # .../moeco

# Cycles still in the package, each with the reason it stays (none today). The test fails when one
# disappears (remove its entry) as well as when a new one appears.
KNOWN_CYCLES: set[frozenset] = set()


def _modules() -> dict[str, Path]:
    mods = {}
    for path in SRC.rglob("*.py"):
        parts = ["moeco", *path.relative_to(SRC).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the moeco modules it imports (`from moeco.fp8 import quantize` -> moeco.fp8.quantize;
    `from moeco.fp8.linear import Fp8Linear` -> moeco.fp8.linear), at any depth of the source."""
    mods = _modules()

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps |= {known(a.name) for a in node.names if a.name.split(".")[0] == "moeco"}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                if base.split(".")[0] != "moeco":
                    continue
                for a in node.names:
                    full = f"{base}.{a.name}"
                    deps.add(full if full in mods else known(base))
        deps.discard(None)
        deps.discard(mod)
        graph[mod] = deps
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that reach each other (Tarjan), only those of two or more."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def a_cycle(graph: dict[str, set[str]], group: list[str]) -> list[str]:
    """One import cycle through the first module of `group`, as a path that ends where it starts."""
    start, members = group[0], set(group)
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for w in sorted(graph[path[-1]] & members):
            if w == start:
                return path + [start]
            if w not in seen:
                seen.add(w)
                paths.append(path + [w])
    return group


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "moeco.fp8.quantize" in graph["moeco.fp8.gemm"] or "moeco.fp8.format" in graph["moeco.fp8.gemm"]
    assert "moeco.checkpoint" in graph["moeco.model.transformer"]  # imported inside a method
    assert "moeco.model.transformer" in graph["moeco.loading"]
    assert "moeco.model.transformer" in graph["moeco"]  # inside moeco.__getattr__


def test_the_model_does_not_import_fp8():
    graph = import_graph()
    bad = {m: sorted(d for d in deps if d == "moeco.fp8" or d.startswith("moeco.fp8."))
           for m, deps in graph.items() if m == "moeco.model" or m.startswith("moeco.model.")}
    bad = {m: d for m, d in bad.items() if d}
    assert not bad, f"model modules importing moeco.fp8: {bad}"


def test_no_import_cycles():
    graph = import_graph()
    groups = strongly_connected(graph)
    found = {frozenset(g) for g in groups}
    new = [" -> ".join(a_cycle(graph, g)) for g in groups if frozenset(g) not in KNOWN_CYCLES]
    assert not new, "import cycles: " + "; ".join(new)
    gone = [sorted(k) for k in KNOWN_CYCLES - found]
    assert not gone, f"no longer a cycle, remove it from KNOWN_CYCLES: {gone}"
