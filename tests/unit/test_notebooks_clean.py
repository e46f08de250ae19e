"""Notebooks in git stay thin and diff-friendly: no outputs, a tagged parameters cell of literals."""
import ast
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))


def test_there_are_numbered_notebooks():
    assert NOTEBOOKS and all(nb.name[:2].isdigit() for nb in NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_stripped_and_parameters_tagged(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)  # e.g. cell ids in a notebook that declares a format without them
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), "run `make strip`"
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    # only literal assignments, so papermill's injected cell can override every one of them
    for node in ast.parse(tagged[0].source).body:
        assert isinstance(node, ast.Assign), ast.dump(node)
        ast.literal_eval(node.value)
