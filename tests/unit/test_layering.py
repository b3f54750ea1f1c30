"""The house's layering (design.md): operators are pure, Ray lives in two modules, no import cycles."""
from __future__ import annotations

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "operators", "jobs")
RAY_MODULES = {"pipeline.executor", "pipeline.submit"}


def _modules() -> dict[str, set[str]]:
    """Every module of the packages -> the names it imports, at any depth (lazy imports too)."""
    graph = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            imports = set()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    imports |= {a.name for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    imports.add(node.module)
                    imports |= {f"{node.module}.{a.name}" for a in node.names}
            graph[name] = imports
    return graph


def _project_edges(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_operators_import_neither_pipeline_nor_ray():
    bad = {m: sorted(d for d in deps if d.split(".")[0] in ("pipeline", "ray"))
           for m, deps in _modules().items() if m.startswith("operators")}
    assert not {m: d for m, d in bad.items() if d}


def test_only_the_executor_and_submission_import_ray():
    users = {m for m, deps in _modules().items() if any(d == "ray" or d.startswith("ray.") for d in deps)}
    assert users <= RAY_MODULES, users - RAY_MODULES


def test_no_import_cycles():
    assert _cycles(_project_edges(_modules())) == []


def test_cycle_detector_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


def test_files_stay_readable():
    long = {str(p.relative_to(REPO)): n for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")
            if (n := p.read_text(encoding="utf-8").count("\n")) > 400}
    assert not long, long
