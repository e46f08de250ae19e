"""Notebook parameters: one source for each notebook's names and defaults.

Each numbered notebook is driven by one config dataclass (``CONFIGS``). The dataclass is the
source: its fields, defaults and end-of-line comments *generate* the notebook's ``parameters``
cell (``python -m utils.params`` rewrites the cells, ``--check`` only compares), the notebook
builds its config from its own namespace with ``config_from`` instead of retyping every name,
and the pipeline reads defaults from here instead of restating them.

This module imports no heavy library; the config classes are imported when first asked for.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import importlib
import inspect
import io
import json
import os
import sys
import textwrap
import tokenize
import tomllib
from pathlib import Path

from .paths import MODELS, NOTEBOOKS_DIR, ROOT, adapter_folder

# notebook -> "module:Class" of the dataclass that declares its parameters
CONFIGS = {
    "01_data_prep.ipynb": "utils.data:PrepareConfig",
    "02_train_lora.ipynb": "utils.training:TrainNotebook",
    "03_evaluate.ipynb": "utils.evaluation:EvalConfig",
    "04_benchmark.ipynb": "utils.benchmark:BenchConfig",
    "05_sweep.ipynb": "utils.sweep:SweepNotebook",
    "06_preference.ipynb": "utils.dpo:PreferenceNotebook",
}
# papermill writes the parameters it is given into a new cell with exactly this first line; the
# generated cells start differently, so they are never mistaken for injected ones.
INJECTED_HEADER = "# Parameters\n"
LINE_LENGTH = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["line-length"]


# Smoke-test sizes, per notebook: `python -m utils.pipeline --quick`, and a notebook run by hand or
# by nbclient with LORA_COMPARE_QUICK=1 (there they replace the defaults only; a value changed from
# its default is kept). Adapters then go to <models_dir>/quick/, so real ones are never touched.
QUICK = {
    "01_data_prep.ipynb": {},
    "02_train_lora.ipynb": {"max_steps": 4, "eval_steps": 2, "save_steps": 2, "batch_size": 4,
                            "max_train_examples": 32, "max_eval_examples": 8, "resume": False},
    # one model in 03 and 04 run by hand (the pipeline keeps its config's models): the one 02 trains by
    # default (each model more costs its conversion, its generations, and in 04 a short training run for
    # an adapter: about 5 of the 11 minutes the five notebooks took)
    "03_evaluate.ipynb": {"models": ["smollm2-135m"], "num_examples": 4, "max_new_tokens": 12, "batch_size": 4,
                          "loss_examples": 8, "suite": "test", "validity": False},
    "04_benchmark.ipynb": {"models": ["smollm2-135m"], "new_tokens": 6, "repeats": 1, "random_models": ["gpt2"],
                           "agreement_prompts": 2},
    "05_sweep.ipynb": {"quick": True, "out": "reports/sweep-quick"},
    # the judge's pairs from 4 training prompts (12-token candidates), then 2 DPO steps
    "06_preference.ipynb": {"num_prompts": 4, "max_new_tokens": 12, "max_steps": 2, "batch_size": 2,
                            "save_steps": 1, "logging_steps": 1, "resume": False},
}
QUICK_SUBDIR = "quick"
QUICK_ENV = "LORA_COMPARE_QUICK"


class ParameterError(ValueError):
    pass


def config_class(notebook: str) -> type:
    name = Path(notebook).name
    if name not in CONFIGS:
        raise ParameterError(f"{notebook}: no config class is registered for it; known notebooks: {sorted(CONFIGS)}")
    module, cls = CONFIGS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def defaults(cls_or_notebook) -> dict:
    """Field name -> default value of a config dataclass (or of a notebook's config)."""
    cls = config_class(cls_or_notebook) if isinstance(cls_or_notebook, str) else cls_or_notebook
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:
            raise ParameterError(f"{cls.__name__}.{f.name} has no default; every notebook parameter needs one")
    return out


def quick_mode() -> bool:
    return os.environ.get(QUICK_ENV, "").strip().lower() in ("1", "true", "yes")


def quick_values(notebook: str, values: dict) -> dict:
    """``values`` with the notebook's smoke-test sizes in place of its defaults (values that differ
    from a default are kept), trained adapters read from and written to ``<models>/quick/``."""
    own = defaults(notebook)
    out = dict(values)
    for name, value in QUICK[Path(notebook).name].items():
        if out.get(name) == own[name]:
            out[name] = value
    if "models_dir" in out and out["models_dir"] == own["models_dir"]:
        out["models_dir"] = f"{own['models_dir']}/{QUICK_SUBDIR}"
    if "output_dir" in own and "model" in own and out.get("output_dir") is None:  # the training notebook
        from .models import resolve

        out["output_dir"] = f"{MODELS}/{QUICK_SUBDIR}/{adapter_folder(resolve(out['model'])['name'])}"
    return out


def config_from(cls: type, namespace: dict, notebook: str | None = None):
    """Build ``cls`` from the same-named variables of a notebook's namespace (``globals()``). With
    ``notebook`` and LORA_COMPARE_QUICK=1, its smoke-test sizes replace the defaults (printed)."""
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [n for n in names if n not in namespace]
    if missing:
        raise ParameterError(f"{cls.__name__}: the namespace has no {missing}; was the parameters cell run?")
    values = {n: namespace[n] for n in names}
    if notebook is not None and quick_mode():
        quick = quick_values(notebook, {**defaults(notebook), **values})
        changed = {n: quick[n] for n in names if quick[n] != values[n]}
        print(f"{QUICK_ENV}=1: smoke-test sizes {changed}")
        values = {n: quick[n] for n in names}
    return cls(**values)


def field_comments(cls: type) -> dict[str, str]:
    """The end-of-line comment of each field in the class source (and its dataclass bases), with
    comment-only lines that directly follow it appended."""
    out = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass) and klass is not object:
            out.update(_own_field_comments(klass))
    return out


def _own_field_comments(cls: type) -> dict[str, str]:
    source = inspect.getsource(cls)
    lines = source.splitlines()
    comments = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments.setdefault(tok.start[0], tok.string.lstrip("#").strip())
    out = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            text, line = [], node.end_lineno
            if line in comments:
                text.append(comments[line])
            while line < len(lines) and lines[line].strip().startswith("#"):
                line += 1
                text.append(comments[line])
            out[node.target.id] = " ".join(text)
    return out


def _literal(value) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    return repr(value)


def parameters_cell(notebook: str) -> str:
    """The text of a notebook's ``parameters`` cell, generated from its config class."""
    cls = config_class(notebook)
    notes = field_comments(cls)
    head = f"# Parameters (from {cls.__module__}.{cls.__name__}: edit there, then python -m utils.params)"
    rows = []
    for name, value in defaults(cls).items():
        row = f"{name} = {_literal(value)}"
        if not notes.get(name):
            rows.append(row)
            continue
        # the comment after the value, and what does not fit in LINE_LENGTH on comment lines below it
        first, *rest = textwrap.wrap(notes[name], max(LINE_LENGTH - len(row) - 4, 20))
        rows.append(f"{row}  # {first}")
        rows += [f"#   {line}" for line in textwrap.wrap(" ".join(rest), LINE_LENGTH - 4)]
    return "\n".join([head, *rows])


def _parameters_index(nb, path: Path) -> int:
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    if len(tagged) != 1:
        raise ParameterError(f"{path}: expected exactly one cell tagged 'parameters', found {len(tagged)}")
    return tagged[0]


def sync(write: bool, notebooks_dir: Path = NOTEBOOKS_DIR) -> list[str]:
    """Notebooks whose parameters cell differs from the generated one (rewritten when ``write``)."""
    import nbformat

    stale = []
    for name in CONFIGS:
        path = notebooks_dir / name
        nb = nbformat.read(path, as_version=4)
        cell = nb.cells[_parameters_index(nb, path)]
        text = parameters_cell(name)
        if cell.source != text:
            stale.append(name)
            if write:
                cell.source = text
                nbformat.write(nb, path)
    return stale


@functools.lru_cache(maxsize=None)
def _inspect(path: str, mtime: float) -> dict:
    import papermill

    return {name: ast.literal_eval(info["default"]) for name, info in papermill.inspect_notebook(path).items()}


def notebook_parameters(notebook: str | Path) -> dict:
    """Names and default values of a notebook's ``parameters`` cell, read as papermill reads them
    (without importing the config classes and what they import)."""
    path = NOTEBOOKS_DIR / notebook if not Path(notebook).is_absolute() else Path(notebook)
    return dict(_inspect(str(path), path.stat().st_mtime))


def injected_parameter_names(history: list[str]) -> list[str]:
    """Names assigned in cells papermill injected, from the kernel's input history (``In``)."""
    names = []
    for source in history:
        if source.startswith(INJECTED_HEADER):
            for node in ast.parse(source).body:
                if isinstance(node, ast.Assign):
                    names += [t.id for t in node.targets if isinstance(t, ast.Name)]
    return names


def check_injected(notebook: str, history: list[str] | None = None) -> None:
    """Called by each notebook right after its parameters: refuse names passed with
    ``papermill -p`` that the notebook does not declare (papermill itself only warns).
    ``history`` defaults to the running kernel's ``In``."""
    if history is None:
        from IPython import get_ipython

        shell = get_ipython()
        history = list(shell.user_ns.get("In", [])) if shell is not None else []
    valid = defaults(notebook)
    unknown = sorted(set(injected_parameter_names(history)) - set(valid))
    if unknown:
        raise ParameterError(f"notebooks/{notebook}: unknown parameter(s) {unknown}; valid parameters: {sorted(valid)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m utils.params", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only report notebooks whose parameters cell is stale")
    args = p.parse_args(argv)
    stale = sync(write=not args.check)
    for name in stale:
        print(f"notebooks/{name}: parameters cell {'differs from' if args.check else 'rewritten from'} "
              f"{CONFIGS[name].replace(':', '.')}")
    return 1 if (stale and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())
