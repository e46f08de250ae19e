"""The sweep's workers as separate processes on one Optuna study (SQLite): a worker killed in the
middle of a trial, then two workers that share the rest. Every trial must complete exactly once,
the killed worker's trial must be failed and run again, and nothing must be trained twice
otherwise. Tiny random models, so that the processes, not the training, are what is tested."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import yaml

from tiny import save_tiny_model, write_splits
from utils import sweep

pytestmark = pytest.mark.slow


def _worker(config, out):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.Popen([sys.executable, "-m", "utils.sweep", "--config", str(config), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _log(out):
    path = out / "sweep.log"
    return path.read_text().splitlines() if path.exists() else []


def test_a_killed_workers_trial_is_retried_and_two_workers_run_every_trial_once(tmp_path):
    model, data = save_tiny_model(tmp_path / "llama", "llama"), write_splits(tmp_path / "data")
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(model), "study": "two-workers", "seed": 0,
        "train": {"max_steps": 2, "batch_size": 4, "data_dir": str(data), "max_eval_examples": 4, "report_to": "none"},
        "learning_rate": {m: 1e-2 for m in sweep.METHODS},
        "quality": {"judge": None, "prompts": 2, "max_new_tokens": 4},
        "decode_tokens": 4, "workers": {"heartbeat_s": 1, "grace_s": 3, "max_retry": 2},
        "grid": [{"method": "lora", "r": [1, 2, 4]}, {"method": "ia3"}, {"method": "prompt", "virtual_tokens": 4},
                 {"method": "full"}],
    }))
    keys = {t.key for t in sweep.expand_grid(sweep.load_config(config))}
    out = tmp_path / "out"

    first = _worker(config, out)
    deadline = time.time() + 240
    while not any(" start " in line for line in _log(out)):
        assert first.poll() is None and time.time() < deadline, first.stdout.read() if first.poll() else "timeout"
        time.sleep(0.05)
    time.sleep(1.0)  # inside the trial: its child process is training
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed = re.search(r" start (\S+) trial (\d+)", _log(out)[0]).groups()
    print("killed the worker during", killed)

    workers = [_worker(config, out), _worker(config, out)]
    for w in workers:
        output, _ = w.communicate(timeout=600)
        assert w.returncode == 0, output[-3000:]

    log = _log(out)
    starts = Counter(re.search(r" start (\S+) ", line).group(1) for line in log if " start " in line)
    done = [re.search(r"pid (\d+) done (\S+) ", line).groups() for line in log if " done " in line]
    assert sorted(k for _, k in done) == sorted(keys), "every trial completes exactly once"
    assert starts == Counter({k: 2 if k == killed[0] else 1 for k in keys}), "trained twice only: the killed one"
    assert {int(pid) for pid, _ in done} == {w.pid for w in workers}, "both workers took trials"

    import optuna

    study = optuna.load_study(study_name="two-workers", storage=sweep.storage_url(out, None))
    by_number = {t.number: t for t in study.get_trials()}
    lost = by_number[int(killed[1])]
    assert lost.state == optuna.trial.TrialState.FAIL
    retried = [t for t in study.get_trials(states=[optuna.trial.TrialState.COMPLETE]) if t.params["key"] == killed[0]]
    assert len(retried) == 1
    assert optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(retried[0]) == lost.number

    doc = json.loads((out / "sweep.json").read_text())
    assert {t["key"] for t in doc["trials"]} == keys and doc["failed"] == []
    full = next(t for t in doc["trials"] if t["method"] == "full")
    assert full["trainable_params"] == full["total_params"]
    assert all(0 < t["trainable_params"] < full["trainable_params"] for t in doc["trials"] if t is not full)
    assert any(t["pareto"] for t in doc["trials"])
    for t in doc["trials"]:  # the interface's fields, also without a judge (quality then has n = 0)
        assert {"method", "r", "targets", "trainable_params", "total_params", "train_seconds", "tokens_per_s",
                "peak_memory_mb", "heldout_loss", "quality", "decode_tokens_per_s", "pareto"} <= set(t)
        assert t["quality"] == {"mean": None, "low": None, "high": None, "n": 0}
        assert t["train_seconds"] > 0 and t["tokens_per_s"] > 0 and t["decode_tokens_per_s"] > 0
    assert sorted(p.name for p in (out / "figures").iterdir()) == ["pareto-memory.png", "pareto-params.png",
                                                                   "pareto-time.png"]
