"""Imports between the modules of utils/ flow one way: no circle, whether the import sits at the top of
a module or inside a function (an import moved into a function to dodge a circle still counts)."""
import ast
from pathlib import Path

import pytest

UTILS = Path(__file__).parents[2] / "utils"


def module_names(folder: Path = UTILS) -> dict[str, Path]:
    """Dotted name (relative to ``folder``) -> file, for the modules of ``folder`` and of its packages
    (sub-folders with an ``__init__.py``); a package's ``__init__.py`` is named after the package."""
    names = {p.stem: p for p in folder.glob("*.py") if p.stem != "__init__"}
    for init in sorted(folder.glob("*/**/__init__.py")):
        package = init.parent
        parts = package.relative_to(folder).parts
        if all((folder.joinpath(*parts[:i + 1]) / "__init__.py").is_file() for i in range(len(parts))):
            names[".".join(parts)] = init
            names.update({".".join([*parts, p.stem]): p for p in package.glob("*.py") if p.stem != "__init__"})
    return names


def import_graph(folder: Path = UTILS) -> dict[str, set[str]]:
    """module -> the modules of ``folder`` it imports anywhere in its code (relative or ``utils.`` imports).
    A package's modules are named with dots (``safety.cascade``; the package's ``__init__.py``: ``safety``),
    so an import circle inside a package, or through it, is found too."""
    modules = module_names(folder)

    def known(dotted: str) -> str | None:  # the module that holds this name (a module, or its package)
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    graph = {}
    for name, path in sorted(modules.items()):
        # the package relative imports start from: the module's own for a package's __init__.py
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom):
                continue
            module = node.module.split(".") if node.module else []
            if node.level >= 1:
                if node.level - 1 > len(here):
                    continue  # above utils/
                base = here[:len(here) - (node.level - 1)] + module
            elif module[:1] == ["utils"]:
                base = module[1:]
            else:
                continue
            # each name imported: a module of its own (from . import judge), or a name in the nearest module above
            targets = {known(".".join(base + [a.name])) for a in node.names}
            found |= {t for t in targets if t and t != name}
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


def test_the_check_reads_a_package_and_finds_a_circle_inside_it_or_through_its_face(tmp_path):
    (tmp_path / "io.py").write_text("x = 1\n")
    (tmp_path / "user.py").write_text("from .pkg import f\nfrom utils.pkg.low import g\n")
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .low import g\nfrom .high import f\n")
    (pkg / "low.py").write_text("from ..io import x\nfrom .. import user\n\ndef g():\n    from . import high\n")
    (pkg / "high.py").write_text("from .low import g\nfrom . import f  # a name of the package's face\n")
    graph = import_graph(tmp_path)
    assert graph == {"io": set(), "user": {"pkg", "pkg.low"}, "pkg": {"pkg.low", "pkg.high"},
                     "pkg.low": {"io", "user", "pkg.high"}, "pkg.high": {"pkg.low", "pkg"}}
    assert circles(graph) == [["pkg", "pkg.high", "pkg.low", "user"]]


def test_the_safety_package_is_read_module_by_module():
    graph = import_graph()
    assert graph["safety"] >= {"safety.cascade", "safety.study"} and "safety" in graph["evaluation"]
    assert graph["safety.cascade"] >= {"safety.classifiers", "judge"} and "safety" not in graph["safety.cascade"]


@pytest.mark.parametrize("module, allowed", [("pareto", set()), ("runinfo", set()), ("limits", set()),
                                             ("suite", {"io", "paths"}), ("roofline", {"generation"})])
def test_the_small_shared_modules_import_nothing_above_them(module, allowed):
    """The modules split out to break the circles stay below those that use them."""
    assert import_graph()[module] <= allowed, import_graph()[module]
