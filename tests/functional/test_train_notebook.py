"""Smoke run of the training notebook on the real offline model (SmolLM2-135M from its GGUF)."""
import json

import nbformat
import pytest

from utils import data, pipeline
from utils.paths import DEFAULT_CORPUS
from utils.pipeline import Step

pytestmark = pytest.mark.slow


def test_train_notebook_on_smollm2(tmp_path):
    processed = tmp_path / "processed"
    data.prepare(DEFAULT_CORPUS, processed, on_error="skip")
    out = tmp_path / "smollm2-lora"
    params = {"model": "smollm2-135m", "data_dir": str(processed), "output_dir": str(out), "max_steps": 3,
              "eval_steps": 3, "save_steps": 3, "batch_size": 2, "max_seq_len": 128, "max_train_examples": 12,
              "max_eval_examples": 4, "load_in_8bit": True}
    run_dir = pipeline.run([Step("02_train_lora-smollm2-135m", "02_train_lora.ipynb", params)],
                           tmp_path / "reports", progress=False)
    run = json.loads((out / "run.json").read_text())
    assert run["model"] == "smollm2-135m" and run["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert run["load_in_8bit"] is True and run["global_step"] == 3
    assert len(run["gguf_sha256"]) == 64
    assert run["trainable_params"] == 460_800  # r=8 on q_proj (576->576) and v_proj (576->192), 30 layers
    assert run["trainable_percent"] < 1
    assert (out / "final" / "adapter_model.safetensors").exists()
    assert (run_dir / "figures" / "loss_curves-smollm2-135m.png").exists()
    assert (run_dir / "runs" / "smollm2-135m.json").exists()
    nb = json.dumps(nbformat.read(run_dir / "02_train_lora-smollm2-135m.ipynb", as_version=4))
    assert "[[" in nb and "<|im_end|>" in nb  # the label-mask preview was rendered
    assert "fewer trainable parameters" in nb
