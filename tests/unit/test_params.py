"""One source for each notebook's parameters: the config dataclass generates the cell, the
notebook builds its config from its namespace, the pipeline reads defaults instead of restating them."""
import dataclasses
import re
import shutil
from pathlib import Path

import nbformat
import pytest

from utils import params, paths, pipeline

NOTEBOOKS = sorted(params.CONFIGS)


def test_every_parameters_cell_is_the_generated_one():
    assert params.sync(write=False) == [], "run `python -m utils.params` and commit the notebooks"


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_notebook_defaults_equal_the_config_defaults(notebook):
    cls = params.config_class(notebook)
    in_notebook = params.notebook_parameters(notebook)  # as papermill reads the cell
    assert list(in_notebook) == [f.name for f in dataclasses.fields(cls)]
    assert in_notebook == params.defaults(cls)


def test_a_changed_default_is_caught_and_regenerated(tmp_path):
    folder = tmp_path / "notebooks"
    shutil.copytree(paths.NOTEBOOKS_DIR, folder)
    path = folder / "02_train_lora.ipynb"
    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assert "\nlora_r = 8  #" in cell.source
    cell.source = cell.source.replace("\nlora_r = 8  #", "\nlora_r = 16  #")
    nbformat.write(nb, path)
    assert params.sync(write=False, notebooks_dir=folder) == ["02_train_lora.ipynb"]
    assert params.sync(write=True, notebooks_dir=folder) == ["02_train_lora.ipynb"]
    assert params.sync(write=False, notebooks_dir=folder) == []
    assert params.notebook_parameters(path)["lora_r"] == 8


def test_comments_travel_from_the_dataclass_and_long_ones_wrap():
    cell = params.parameters_cell("02_train_lora.ipynb")
    assert "\nlora_r = 8  # rank of the update\n" in cell
    assert all(len(line) <= params.LINE_LENGTH for line in cell.splitlines())
    # the comment-only line under `dtype` in TrainConfig is part of its note
    assert "AMX / AVX-512-BF16" in cell
    assert not cell.startswith(params.INJECTED_HEADER)  # else papermill's check would read it as injected


def test_config_from_takes_every_field_by_name_and_names_what_is_missing():
    from utils.training import TrainConfig

    namespace = {**params.defaults(TrainConfig), "lora_r": 4, "unrelated": 1}
    cfg = params.config_from(TrainConfig, namespace)
    assert cfg.lora_r == 4 and cfg == dataclasses.replace(TrainConfig(), lora_r=4)
    del namespace["seed"]
    with pytest.raises(params.ParameterError, match=r"TrainConfig: the namespace has no \['seed'\]"):
        params.config_from(TrainConfig, namespace)


def test_injected_parameter_names_come_only_from_papermills_cell():
    history = ["", "import json", "# Parameters (papermill overrides these)\nmodel = 'a'\nseed = 0\n",
               "# Parameters\nseed = 3\nval_fracton = 0.2\n", "cfg = make(seed)"]
    assert params.injected_parameter_names(history) == ["seed", "val_fracton"]


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_each_notebook_checks_injected_names_right_after_its_parameters(notebook):
    nb = nbformat.read(paths.NOTEBOOKS_DIR / notebook, as_version=4)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    following = nb.cells[tagged[0] + 1]
    assert following.source.startswith(f'params.check_injected("{notebook}")')
    valid = list(params.notebook_parameters(notebook))
    params.check_injected(notebook, [params.INJECTED_HEADER + "".join(f"{n} = 1\n" for n in valid)])
    with pytest.raises(params.ParameterError, match=r"unknown parameter\(s\) \['lora_rr'\]; valid parameters: \["):
        params.check_injected(notebook, [params.INJECTED_HEADER + "lora_rr = 4\n"])


@pytest.mark.parametrize("notebook", ["02_train_lora.ipynb", "03_evaluate.ipynb"])
def test_notebooks_build_their_config_from_the_namespace(notebook):
    source = "\n".join(c.source for c in nbformat.read(paths.NOTEBOOKS_DIR / notebook, as_version=4).cells)
    assert "params.config_from(" in source
    assert not re.search(r"\blora_r=lora_r\b|\bnum_examples=num_examples\b", source)


def test_pipeline_takes_defaults_from_the_notebook():
    steps = pipeline.plan({"models": ["smollm2-135m"]})
    train = next(s for s in steps if s.notebook == "02_train_lora.ipynb")
    evaluate = next(s for s in steps if s.notebook == "03_evaluate.ipynb")
    assert pipeline.param(train, "eval_steps") == params.defaults("02_train_lora.ipynb")["eval_steps"]
    assert pipeline.param(evaluate, "data_dir") == params.defaults("01_data_prep.ipynb")["output_dir"]
    assert pipeline.train_output(train) == paths.adapter_root("smollm2-135m")


def test_pipeline_restates_no_notebook_default():
    """No `<parameters>.get("<notebook parameter>", <literal>)` fallback in the orchestrator."""
    import ast

    names = {n for nb in NOTEBOOKS for n in params.defaults(nb)}
    tree = ast.parse((paths.ROOT / "utils" / "pipeline.py").read_text())
    restated = [
        f"line {node.lineno}: get({node.args[0].value!r}, {node.args[1].value!r})"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
        and len(node.args) == 2 and isinstance(node.args[0], ast.Constant) and node.args[0].value in names
        and isinstance(node.args[1], ast.Constant)
    ]
    assert restated == []


def test_the_adapter_layout_is_spelled_out_only_in_paths():
    """`<models_dir>/<name>-lora/final` is written in utils/paths.py and nowhere else."""
    offenders = []
    for path in sorted((paths.ROOT / "utils").glob("*.py")) + [paths.ROOT / "streamlit_app.py"]:
        if path.name == "paths.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"""}-lora|["']final["']|["']data/processed["']""", code):
                offenders.append(f"{path.relative_to(paths.ROOT)}:{n}: {line.strip()}")
    assert offenders == []


def test_paths_helpers_agree():
    root = paths.adapter_root("smollm2-135m", "models/quick")
    assert root == paths.ROOT / "models" / "quick" / "smollm2-135m-lora"
    assert paths.final_adapter(root) == root / "final" and not paths.has_adapter(Path("/nonexistent"))


def test_the_pipeline_config_states_only_what_differs_from_the_notebooks():
    config = pipeline.load_config()
    same = [f"{section}.{name}" for section, notebook in pipeline.SECTIONS.items()
            for name, value in (config.get(section) or {}).items()
            if value == params.notebook_parameters(notebook)[name]]
    same += [f"train_per_model.{m}.{name}" for m, over in (config.get("train_per_model") or {}).items()
             for name, value in over.items() if value == params.notebook_parameters("02_train_lora.ipynb")[name]]
    assert same == [], "configs/pipeline.yaml restates notebook defaults"


def test_show_prints_every_parameter_and_marks_the_configs(capsys):
    assert pipeline.main(["--show"]) == 0
    out = capsys.readouterr().out
    assert "    on_error = 'skip'" in out and "    lora_r = 8" in out
    assert "  * learning_rate = 0.0005" in out  # gemma's override
    train = next(s for s in pipeline.plan(pipeline.load_config()) if s.notebook == "02_train_lora.ipynb")
    assert out.count("02_train_lora-") == 2 and all(f" {n} = " in out for n in params.defaults(train.notebook))
