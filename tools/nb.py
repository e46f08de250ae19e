"""Tiny helper to write clean notebooks from a list of cells (used when authoring notebooks;
the committed .ipynb files are the source of truth, edit them in JupyterLab as usual)."""
from __future__ import annotations

import sys

import nbformat


def build(path: str, cells: list[tuple[str, str] | tuple[str, str, list[str]]]) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"name": "lora-compare", "display_name": "Python (lora-compare)", "language": "python"},
        "language_info": {"name": "python"},
    }
    for kind, src, *tags in cells:
        cell = nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
        if tags:
            cell.metadata["tags"] = tags[0]
        cell.pop("id", None)
        nb.cells.append(cell)
    nb.nbformat_minor = 4  # no cell ids: smaller diffs
    nbformat.write(nb, path)


if __name__ == "__main__":
    sys.exit("import build() from here")
