"""The house's plan, kept: the imports of every module under appliance/ (at module level and inside functions)
form no cycle, and go down the layers only: faces -> stages -> trust -> base (README, "Architecture")."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "appliance"

# The layers, lowest first. A module is in the first layer one of whose prefixes names it; the rest are stages.
BASE = ("appliance.errors", "appliance.workspace", "appliance.events", "appliance.native_crash")
TRUST = ("appliance.trust",)
FACES = ("appliance.cli", "appliance.doctor", "appliance.demo", "appliance.render")
LAYERS = ("base", "trust", "stages", "faces")


def layer(module: str) -> str:
    def under(prefixes):
        return any(module == p or module.startswith(p + ".") for p in prefixes)

    if module == "appliance":  # the package itself sets the offline switches and installs the guard: a trust act
        return "trust"
    return "base" if under(BASE) else "trust" if under(TRUST) else "faces" if under(FACES) else "stages"


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The appliance modules ``name`` imports, wherever in the file: ``from . import x`` names module x,
    ``from .x import f`` module x. Edges to the module's own ancestor packages are Python's (a submodule's package
    is imported first), not a choice of ours, and are left out."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # appliance.x.f -> appliance.x
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), as a closed path through it."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(_path(g, set(comp)))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def _path(g, comp: set[str]) -> list[str]:
    """A cycle inside a strongly connected component, from its first module back to it (breadth-first)."""
    start = min(comp)
    prev, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(g[v] & comp):
                if w == start:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, v, start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(comp)


def test_the_import_graph_has_no_cycle():
    found = cycles(graph())
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_imports_go_down_the_layers():
    upward = sorted(f"{a} ({layer(a)}) imports {b} ({layer(b)})" for a, deps in graph().items() for b in deps
                    if LAYERS.index(layer(b)) > LAYERS.index(layer(a)))
    assert not upward, "a lower layer imports a higher one: " + "; ".join(upward)


def test_the_checks_see_what_they_claim():
    """The reader finds imports inside functions and relative ones; the cycle finder names a planted cycle."""
    g = graph()
    assert "appliance.trust.keyring" in g["appliance.trust.keys"]  # imported inside a function
    assert "appliance.trust.audit" in g["appliance.trust.keyring"]  # `from . import audit, signing`
    assert "appliance.convert" in g["appliance.export"]
    planted = {**g, "appliance.trust.audit": g["appliance.trust.audit"] | {"appliance.trust.keyring"}}
    assert any(c[0] == c[-1] and {"appliance.trust.audit", "appliance.trust.keyring"} <= set(c) for c in cycles(planted))
    assert layer("appliance.cli.answers") == "faces" and layer("appliance.trust.egress") == "trust"
    upward = {**g, "appliance.workspace": g["appliance.workspace"] | {"appliance.doctor"}}
    assert [(a, b) for a, deps in upward.items() for b in deps if LAYERS.index(layer(b)) > LAYERS.index(layer(a))] \
        == [("appliance.workspace", "appliance.doctor")]
    assert layer("appliance.train.worker") == "stages" and layer("appliance.workspace") == "base"
