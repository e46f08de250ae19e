"""Start the dashboard with ``streamlit run`` on a free loopback port, and a headless Debian Chromium
for Playwright. Shared by the browser tests; the browser is skipped where Chromium is missing
unless REQUIRE_BROWSER=1 (set by .ci/run) makes its absence a failure."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tiny import save_tiny_model, write_splits
from utils import training
from utils.coldstart import CHROMIUM, CHROMIUM_ARGS  # noqa: F401  (the browser tests import them from here)
from utils.training import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def require_chromium() -> None:
    if not Path(CHROMIUM).exists():
        if os.environ.get("REQUIRE_BROWSER") == "1":
            pytest.fail(f"chromium not found at {CHROMIUM} (apt-get install chromium chromium-driver)")
        pytest.skip("Debian chromium is not installed")


def tiny_world(root: Path, adapters: dict[str, dict]) -> dict:
    """Splits, a tiny random Llama base and one LoRA adapter per entry of ``adapters``
    (name -> TrainConfig overrides) under ``root/models``."""
    data = write_splits(root / "data")
    base = save_tiny_model(root / "tiny-llama", "llama")
    for name, overrides in adapters.items():
        kw = dict(load_in_8bit=False, max_steps=2, eval_steps=2, save_steps=2, batch_size=4) | overrides
        training.train(TrainConfig(model=str(base), data_dir=str(data), output_dir=str(root / "models" / name), **kw),
                       log=lambda *a: None)
    return {"data": data, "base": base, "models": root / "models", "root": root}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def dashboard(world: dict, extra_env: dict | None = None):
    """Yield (url, process) of a running dashboard over ``world``; stopped on exit."""
    root = world["root"]
    env = {**os.environ, "LORA_COMPARE_MODELS_DIR": str(world["models"]), "LORA_COMPARE_DATA_DIR": str(world["data"]),
           "LORA_COMPARE_BASES": str(world["base"]), "LORA_COMPARE_RATINGS_DB": str(root / "ratings.sqlite"),
           "LORA_COMPARE_REPORTS_DIR": str(root / "reports"), "LORA_COMPARE_JUDGE": str(world["base"]),
           "LORA_COMPARE_SAFETY_SCREEN": "none",  # the 1.5B screen: tests/unit/test_safety_cascade.py
           **(extra_env or {})}
    port = _free_port()
    log = open(root / "streamlit.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "streamlit_app.py"),
                             "--server.headless", "true", "--server.port", str(port), "--server.address", "127.0.0.1",
                             "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/_stcore/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail("streamlit did not start:\n" + (root / "streamlit.log").read_text()[-3000:])
                time.sleep(0.5)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
