"""Training killed with SIGKILL at a random step, then resumed, ends with the same last checkpoint
as an uninterrupted run (dropout 0, same seed), runs only the remaining steps, and its train-loss
history equals the uninterrupted one value by value, with no gap and no duplicate step."""
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
    print(f"seed {seed}: SIGKILL once checkpoint-{kill_at} (or a later one) exists")
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
    full_run = json.loads((tmp_path / "full" / "run.json").read_text())
    assert run["resumed_from"] is not None
    resumed_at = int(run["resumed_from"].split("-")[1])
    # the kill may land while checkpoint-<kill_at> is being written: then it is torn, moved aside,
    # and the run resumes from the one before
    torn = sorted(p.name for p in out.glob("torn-checkpoint-*"))
    assert resumed_at >= kill_at or (resumed_at == kill_at - 2 and torn == [f"torn-checkpoint-{kill_at}"])
    print(f"resumed from step {resumed_at}; moved aside: {torn}")
    assert run["steps_this_session"] == STEPS - resumed_at, "the resumed process did not run only the rest"
    steps = [p["step"] for p in run["loss_history"]["train"]]
    assert steps == list(range(1, STEPS + 1)), "loss history has a gap or a duplicate step"
    losses = [p["loss"] for p in run["loss_history"]["train"]]
    assert losses == pytest.approx([p["loss"] for p in full_run["loss_history"]["train"]], rel=1e-6)
    # the last checkpoint (final/ holds the best one, which may come from before the kill)
    for folder in (f"checkpoint-{STEPS}", "final"):
        a = load_file(str(tmp_path / "full" / folder / "adapter_model.safetensors"))
        b = load_file(str(out / folder / "adapter_model.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
