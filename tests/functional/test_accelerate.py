"""Training runs unchanged under `accelerate launch --cpu --num_processes 2` (gloo) and matches the
single-process run. The comparison is made exact by construction: 8 training conversations and a
batch size of 8 in both runs, so every optimizer step sees the whole training set (in two processes
each takes its 4-conversation shard; the non-padding token count per step is the same in both runs),
and every conversation has the same number of tokens and of trained tokens, so averaging per process
and then across processes equals the single process's mean. What is left is floating-point summation
order, hence the tolerance: adapter weights within 1e-4 absolute, final validation loss within 1e-4
relative."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tiny import save_tiny_model

pytestmark = pytest.mark.slow


def _args(model, data, out, batch):
    return ["--model", str(model), "--data-dir", str(data), "--output-dir", str(out), "--max-steps", "6",
            "--eval-steps", "3", "--save-steps", "3", "--batch-size", str(batch), "--lora-dropout", "0",
            "--load-in-8bit", "false", "--learning-rate", "0.02", "--resume", "false", "--seed", "3"]


def test_two_process_cpu_training_matches_single_process(tmp_path):
    model = save_tiny_model(tmp_path / "tiny", "llama")
    data = tmp_path / "data"
    data.mkdir()
    words = ["cat", "dog", "sun", "owl"]
    for split, offset in (("train", 10), ("validation", 50), ("test", 80)):
        rows = [{"id": f"{split}{i}", "source": "tiny", "messages": [
            {"role": "user", "content": f"say {words[i % 4]} {offset + i}"},
            {"role": "assistant", "content": " ".join([words[i % 4]] * 3)}]} for i in range(8)]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "utils.training", *_args(model, data, tmp_path / "one", 8)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
                            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                            "-m", "utils.training", *_args(model, data, tmp_path / "two", 8)],
                           capture_output=True, text=True, env=env, timeout=600)
    assert multi.returncode == 0, multi.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "run.json").read_text())
    two = json.loads((tmp_path / "two" / "run.json").read_text())
    assert one["global_step"] == two["global_step"] == 6
    assert one["train_tokens"] == two["train_tokens"]
    assert two["best_eval_loss"] == pytest.approx(one["best_eval_loss"], rel=1e-4)
    a = load_file(str(tmp_path / "one" / "final" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-4)
