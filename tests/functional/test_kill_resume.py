"""Training killed with SIGKILL at a random step, then resumed, ends with the same adapter as an
uninterrupted run (dropout 0, same seed), and its loss history has no gap and no duplicate step."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tiny import save_tiny_model, write_splits

pytestmark = pytest.mark.slow
STEPS = 40


def _cmd(model, data, out, resume):
    return [sys.executable, "-m", "utils.training", "--model", str(model), "--data-dir", str(data),
            "--output-dir", str(out), "--max-steps", str(STEPS), "--eval-steps", "2", "--save-steps", "2",
            "--batch-size", "4", "--lora-dropout", "0", "--load-in-8bit", "false", "--learning-rate", "0.01",
            "--logging-steps", "1", "--seed", "5", "--resume", "true" if resume else "false"]


@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, seed):
    model = save_tiny_model(tmp_path / "tiny", "llama")
    data = write_splits(tmp_path / "data", n_train=32, n_val=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = subprocess.run(_cmd(model, data, tmp_path / "full", False), capture_output=True, text=True, env=env)
    assert full.returncode == 0, full.stderr[-3000:]

    kill_at = random.Random(seed).randrange(4, STEPS - 6, 2)  # a checkpoint step
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _cmd(model, data, out, False), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any(
            int(p.name.split("-")[1]) >= kill_at for p in out.glob("checkpoint-*") if p.name.split("-")[1].isdigit()
        ):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    assert not (out / "final").exists()

    resumed = subprocess.run(_cmd(model, data, out, True), capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["resumed_from"] is not None and int(run["resumed_from"].split("-")[1]) >= 2
    steps = [p["step"] for p in run["loss_history"]["train"]]
    assert steps == list(range(1, STEPS + 1)), "loss history has a gap or a duplicate step"
    a = load_file(str(tmp_path / "full" / "final" / "adapter_model.safetensors"))
    b = load_file(str(out / "final" / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
