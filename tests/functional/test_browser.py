"""End to end in a real headless Chromium: start the app on localhost, type a prompt, click
Generate, wait for both outputs, save a screenshot. Needs Debian's chromium (.ci/run installs it);
elsewhere the test is skipped unless REQUIRE_BROWSER=1 makes its absence a failure."""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tiny import save_tiny_model, write_splits
from utils import training
from utils.training import TrainConfig

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    if not Path(CHROMIUM).exists():
        if os.environ.get("REQUIRE_BROWSER") == "1":
            pytest.fail(f"chromium not found at {CHROMIUM} (apt-get install chromium chromium-driver)")
        pytest.skip("Debian chromium is not installed")
    data = write_splits(tmp_path / "data")
    base = save_tiny_model(tmp_path / "tiny-llama", "llama")
    training.train(TrainConfig(model=str(base), data_dir=str(data), output_dir=str(tmp_path / "models" / "tiny-lora"),
                               load_in_8bit=False, max_steps=2, eval_steps=2, save_steps=2, batch_size=4),
                   log=lambda *a: None)
    port = _free_port()
    env = {**os.environ, "LORA_COMPARE_MODELS_DIR": str(tmp_path / "models"), "LORA_COMPARE_DATA_DIR": str(data),
           "LORA_COMPARE_BASES": str(base), "LORA_COMPARE_RATINGS_DB": str(tmp_path / "r.sqlite"),
           "LORA_COMPARE_REPORTS_DIR": str(tmp_path / "reports")}
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "streamlit_app.py"),
                             "--server.headless", "true", "--server.port", str(port), "--server.address", "127.0.0.1",
                             "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/_stcore/health", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("streamlit did not start:\n" + (proc.stdout.read() if proc.stdout else ""))
    yield url
    proc.terminate()
    proc.wait(timeout=20)


def test_type_prompt_generate_and_screenshot(server, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(server)
        page.get_by_role("textbox", name="Prompt").fill("say cat 3")
        page.keyboard.press("Control+Enter")  # commit the text area value
        page.get_by_role("button", name="Generate").click()
        page.get_by_text("tokens/s").nth(1).wait_for(timeout=120_000)
        latency = page.get_by_text("latency")
        assert latency.count() >= 2
        shot = ROOT / "reports" / "screenshots" / "compare.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.stat().st_size > 10_000
