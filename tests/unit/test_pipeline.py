from pathlib import Path

import pytest

from utils import pipeline
from utils.pipeline import PipelineError, Step


def test_unknown_parameter_is_refused_with_valid_names():
    with pytest.raises(PipelineError) as err:
        pipeline.plan({"data": {"seed": 1, "val_fracton": 0.2}}, source="my.yaml")
    msg = str(err.value)
    assert "my.yaml [01_data_prep]: unknown parameter(s) ['val_fracton']" in msg
    assert "'val_fraction'" in msg and "'input_path'" in msg


def test_config_errors_name_the_file(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("dta:\n  seed: 1\n")
    with pytest.raises(PipelineError, match=r"c.yaml: unknown section\(s\) \['dta'\]; valid sections"):
        pipeline.load_config(bad)
    bad.write_text("data: [1, 2]\n")
    with pytest.raises(PipelineError, match="section 'data' must be a mapping"):
        pipeline.load_config(bad)
    with pytest.raises(PipelineError, match="config file not found"):
        pipeline.load_config(tmp_path / "none.yaml")


def test_default_config_plans_valid_steps():
    steps = pipeline.plan(pipeline.load_config())
    assert steps[0].name == "01_data_prep"
    assert pipeline.param(steps[0], "input_path") == "embedded:supportive-chat"


def test_latest_symlink_is_replaced_atomically(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    pipeline.point_latest(tmp_path, tmp_path / "a")
    pipeline.point_latest(tmp_path, tmp_path / "b")
    assert (tmp_path / "latest").resolve() == (tmp_path / "b").resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "latest"]


def test_unfinished_run_with_same_plan_is_found(tmp_path):
    steps = [Step("01_data_prep", "01_data_prep.ipynb", {"seed": 1})]
    fp = pipeline._fingerprint(steps)
    for name, complete, f in [("20260101-000000", True, fp), ("20260102-000000", False, fp),
                              ("20260103-000000", False, "other")]:
        (tmp_path / name).mkdir()
        pipeline._write_state(tmp_path / name, {"fingerprint": f, "complete": complete})
    assert pipeline.find_unfinished_run(tmp_path, fp).name == "20260102-000000"
    assert pipeline.find_unfinished_run(tmp_path, "nope") is None


def test_plan_has_one_training_step_per_model():
    config = {"data": {"output_dir": "data/x"}, "models": ["smollm2-135m", "gemma3-270m"],
              "train": {"lora_r": 4}, "train_per_model": {"gemma3-270m": {"learning_rate": 1e-3}}}
    steps = pipeline.plan(config)
    assert [s.name for s in steps] == ["01_data_prep", "02_train_lora-smollm2-135m", "02_train_lora-gemma3-270m",
                                       "03_evaluate", "04_benchmark"]
    assert steps[1].parameters == {"lora_r": 4, "model": "smollm2-135m", "data_dir": "data/x"}
    assert steps[2].parameters["learning_rate"] == 1e-3
    assert steps[3].parameters == {
        "models": ["smollm2-135m", "gemma3-270m"],
        "models_dir": "models",
        "data_dir": "data/x",
    }
    assert [s.name for s in pipeline.plan(config, models=["gpt2"])][1:] == ["02_train_lora-gpt2", "03_evaluate",
                                                                           "04_benchmark"]


def test_quick_plan_uses_tiny_sizes_and_a_separate_folder():
    steps = pipeline.plan({"models": ["smollm2-135m"], "train": {"max_steps": 500}}, quick=True)
    params = steps[1].parameters
    assert params["max_steps"] == 4 and params["output_dir"] == "models/quick/smollm2-135m-lora"
    assert params["resume"] is False
    assert steps[2].parameters["models_dir"] == "models/quick" and steps[2].parameters["num_examples"] == 4


def test_a_quick_pipeline_evaluates_and_benchmarks_every_model_it_trains():
    # notebooks 03 and 04 run by hand in quick mode take one model; the pipeline keeps its config's
    steps = pipeline.plan({"models": ["smollm2-135m", "gemma3-270m"]}, quick=True)
    by_name = {s.name: s.parameters for s in steps}
    assert by_name["03_evaluate"]["models"] == by_name["04_benchmark"]["models"] == ["smollm2-135m", "gemma3-270m"]
    assert by_name["03_evaluate"]["num_examples"] == 4 and by_name["04_benchmark"]["new_tokens"] == 6


def test_unknown_training_parameter_and_model_override_are_refused():
    with pytest.raises(PipelineError, match=r"unknown parameter\(s\) \['lora_rank'\] for 02_train_lora.ipynb"):
        pipeline.plan({"models": ["gpt2"], "train": {"lora_rank": 4}})
    with pytest.raises(PipelineError, match=r"train_per_model names \['gpt2'\], which are not in models"):
        pipeline.plan({"models": ["smollm2-135m"], "train_per_model": {"gpt2": {}}})


def test_model_paths_outside_models_dir_are_refused(tmp_path):
    from utils.paths import MODELS_DIR

    outside = tmp_path / "weights"
    outside.mkdir()
    with pytest.raises(PipelineError, match=r"model path .*weights is outside .*models"):
        pipeline.plan({"models": [str(outside)]})
    MODELS_DIR.mkdir(exist_ok=True)
    link = MODELS_DIR / "escape-link-test"
    link.unlink(missing_ok=True)
    link.symlink_to(outside, target_is_directory=True)
    try:
        with pytest.raises(PipelineError, match="is outside"):
            pipeline.check_model_name(str(link))
    finally:
        link.unlink()
    pipeline.check_model_name("smollm2-135m")
    pipeline.check_model_name("org/some-hub-model")




def test_saved_paths_carry_no_machine_folder_and_read_back(tmp_path, monkeypatch):
    from pathlib import Path

    from utils.paths import ROOT, from_root, shown

    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    cached = home / ".cache" / "lora-compare" / "base.gguf"
    assert shown(cached) == "~/.cache/lora-compare/base.gguf"
    assert from_root(shown(cached)) == cached
    assert shown(ROOT / "reports" / "run-1") == "reports/run-1"
    assert from_root(shown(ROOT / "reports" / "run-1")) == ROOT / "reports" / "run-1"
    elsewhere = tmp_path / "other" / "x.json"  # neither in the repository nor at home: as given
    assert shown(elsewhere) == str(elsewhere)
    assert shown(home) == str(home) and shown(Path("data/processed")) == "data/processed"


def test_the_safety_classifiers_are_a_named_timed_step_run_before_the_evaluation(tmp_path, monkeypatch):
    import json
    import sys

    import papermill

    from utils import safety

    order = []
    marker = tmp_path / "fitted"
    monkeypatch.setattr(safety, "fitted", lambda: marker.exists())

    def fake_execute(source, output, parameters=None, **kw):
        order.append(("notebook", Path(source).name, marker.exists()))
        Path(output).write_text("{}")

    monkeypatch.setattr(papermill, "execute_notebook", fake_execute)
    monkeypatch.setattr(pipeline, "finish_report", lambda run_dir, steps: None)
    fit = [sys.executable, "-c", f"import pathlib; pathlib.Path({str(marker)!r}).write_text('x')"]
    steps = [Step("02_train_lora-x", "02_train_lora.ipynb", {"model": "smollm2-135m"}),
             Step("03_evaluate", "03_evaluate.ipynb", {"models": []})]
    monkeypatch.setattr(pipeline, "step_inputs", lambda step: [])
    monkeypatch.setattr(pipeline, "external_outputs_present", lambda step: True)
    run_dir = pipeline.run(steps, tmp_path / "reports", progress=False, run_id="r", safety_command=fit)
    # the fit ran between training and the evaluation, which found the classifiers fitted
    assert order == [("notebook", "02_train_lora.ipynb", False), ("notebook", "03_evaluate.ipynb", True)]
    step = json.loads((run_dir / "run.json").read_text())["steps"][pipeline.SAFETY_STEP]
    assert step["status"] == "done" and step["already_fitted"] is False and step["seconds"] >= 0
    # a failing fit stops the run, named, and is recorded as failed
    state = {"steps": {}}
    with pytest.raises(PipelineError, match=r"safety_classifiers failed .*exited with 3"):
        pipeline.fit_safety(state, tmp_path, [sys.executable, "-c", "raise SystemExit(3)"])
    assert state["steps"][pipeline.SAFETY_STEP]["status"] == "failed"
