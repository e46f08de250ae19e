"""Imports between the modules of utils/ flow one way: no circle, whether the import sits at the top of
a module or inside a function (an import moved into a function to dodge a circle still counts)."""
import ast
from pathlib import Path

import pytest

UTILS = Path(__file__).parents[2] / "utils"


def import_graph(folder: Path = UTILS) -> dict[str, set[str]]:
    """module -> the modules of ``folder`` it imports anywhere in its code (relative or ``utils.`` imports)."""
    modules = {p.stem for p in folder.glob("*.py")} - {"__init__"}
    graph = {}
    for name in sorted(modules):
        found = set()
        for node in ast.walk(ast.parse((folder / f"{name}.py").read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level == 1:
                targets = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
            elif node.level == 0 and node.module and node.module.split(".")[0] == "utils":
                parts = node.module.split(".")
                targets = [parts[1]] if len(parts) > 1 else [a.name for a in node.names]
            else:
                continue
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (each holds an import circle)."""
    order, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        order[v] = low[v] = len(order)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in order:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], order[w])
        if low[v] == order[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in graph:
        if v not in order:
            visit(v)
    return out


def test_the_utils_modules_import_each_other_in_one_direction_only():
    graph = import_graph()
    assert len(graph) > 20 and graph["evaluation"] >= {"suite", "validity"}  # it reads what it should
    assert circles(graph) == [], {m: sorted(graph[m]) for group in circles(graph) for m in group}


def test_the_check_finds_a_circle_made_through_an_import_inside_a_function(tmp_path):
    (tmp_path / "low.py").write_text("from .io import x\n\ndef f():\n    from .high import g  # runs back up\n")
    (tmp_path / "high.py").write_text("from . import low\n")
    (tmp_path / "io.py").write_text("x = 1\n")
    (tmp_path / "alone.py").write_text("from utils.io import x\n")
    graph = import_graph(tmp_path)
    assert graph == {"alone": {"io"}, "high": {"low"}, "io": set(), "low": {"high", "io"}}
    assert circles(graph) == [["high", "low"]]


@pytest.mark.parametrize("module, allowed", [("pareto", set()), ("runinfo", set()), ("limits", set()),
                                             ("suite", {"io", "paths"}), ("roofline", {"generation"})])
def test_the_small_shared_modules_import_nothing_above_them(module, allowed):
    """The modules split out to break the circles stay below those that use them."""
    assert import_graph()[module] <= allowed, import_graph()[module]
