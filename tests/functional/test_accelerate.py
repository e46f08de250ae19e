"""Training runs unchanged as two processes (gloo on the CPU, started by `accelerate launch` with
configs/accelerate/cpu-2proc.yaml) and matches the single-process run with the same global batch.

Two processes with a per-device batch of 4 see, at each step, the two halves of the batch of 8 that
one process sees (accelerate shards each global batch), and the Trainer divides the summed loss by
the number of trained tokens over all processes. So the runs are mathematically the same; what
differs is floating-point summation order and padding per shard. Tolerance: adapter weights within
1e-4 absolute, validation losses within 1e-4 relative. The data has 24 conversations of different
lengths (three full global batches per epoch, so epochs end at the same step in both runs; uneven
token counts per shard), and the test checks that two
processes really ran: `accelerate launch --cpu --num_processes 2` starts only one (see the config)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from streamlit_server import ROOT
from tiny import save_tiny_model

pytestmark = pytest.mark.slow


def _args(model, data, out, batch):
    return ["--model", str(model), "--data-dir", str(data), "--output-dir", str(out), "--max-steps", "6",
            "--eval-steps", "3", "--save-steps", "3", "--batch-size", str(batch), "--lora-dropout", "0",
            "--load-in-8bit", "false", "--learning-rate", "0.02", "--resume", "false", "--seed", "3",
            # fp32 on every machine: the tolerance is for summation order, and "auto" picks bf16 autocast
            # where the CPU has native bf16 (its rounding moved a validation loss by 7e-4 relative there)
            "--dtype", "fp32"]


def test_two_process_training_matches_single_process(tmp_path):
    model = save_tiny_model(tmp_path / "tiny", "llama")
    data = tmp_path / "data"
    data.mkdir()
    words = ["cat", "dog", "sun", "owl", "tree"]
    for split, n, offset in (("train", 24, 10), ("validation", 8, 50), ("test", 8, 80)):
        rows = [{"id": f"{split}{i}", "source": "tiny", "messages": [
            {"role": "user", "content": f"say {words[i % 5]} {offset + i}" + " please" * (i % 3)},
            {"role": "assistant", "content": " ".join([words[i % 5]] * (1 + i % 4))}]} for i in range(n)]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "utils.training", *_args(model, data, tmp_path / "one", 8)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = subprocess.run([sys.executable, "-m", "accelerate.commands.launch",
                            "--config_file", str(ROOT / "configs" / "accelerate" / "cpu-2proc.yaml"),
                            "-m", "utils.training", *_args(model, data, tmp_path / "two", 4)],
                           capture_output=True, text=True, env=env, timeout=600)
    assert multi.returncode == 0, multi.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "run.json").read_text())
    two = json.loads((tmp_path / "two" / "run.json").read_text())
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["global_step"] == two["global_step"] == 6
    assert one["train_tokens"] == two["train_tokens"]  # the same conversations, summed over processes
    for a, b in zip(one["loss_history"]["validation"], two["loss_history"]["validation"], strict=True):
        assert a["step"] == b["step"] and b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    a = load_file(str(tmp_path / "one" / "final" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    moved = max((a[k] - b[k]).abs().max().item() for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-4)
    # and the adapters did train: the B matrices start at zero
    assert max(v.abs().max().item() for k, v in a.items() if "lora_B" in k) > 1e-3, moved
