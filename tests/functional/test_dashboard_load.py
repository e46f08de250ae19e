"""Eight real dashboard sessions at once, through the Streamlit server on localhost.

Each session is a Chromium page (its own websocket session on the server) that generates three
times with two different LoRA adapters side by side. Every reply must equal what a session
alone gets for the same prompt (no mixed-up adapters, no lost or empty replies), no page may
show an exception, and the server's peak resident memory during the load is recorded in
reports/load/dashboard_load.json and bounded. (AppTest instances in threads cannot do this:
AppTest swaps a process-global Runtime for the length of each run, so parallel instances
disturb each other.)"""
import json
import threading
import time

import psutil
import pytest

from streamlit_server import CHROMIUM, CHROMIUM_ARGS, dashboard, require_chromium, tiny_world

pytestmark = pytest.mark.slow
SESSIONS, ROUNDS = 8, 3
PROMPTS = ["say cat 1", "say dog 22", "say sun 333", "say owl 4444"]
REPLY_TIMEOUT_S = 240


def _generate(page, prompt):
    box = page.get_by_role("textbox", name="Prompt")
    box.fill(prompt)
    box.press("Control+Enter")  # commit the text area value before clicking
    page.get_by_role("button", name="Generate").click()


def _replies(page):
    return page.locator(".st-key-reply_A").inner_text(), page.locator(".st-key-reply_B").inner_text()


def _wait_for(page, expected, deadline):
    """Poll until both replies equal ``expected`` and nothing on the page is stale (a rerun in
    progress); return what the page shows at the end (equal to ``expected`` unless timed out)."""
    shown = None
    while time.time() < deadline:
        if page.locator(".st-key-reply_B").count() and not page.locator('[data-stale="true"]').count():
            shown = _replies(page)
            if shown == expected and page.get_by_text("tokens/s").count() == 2:
                return shown
        page.wait_for_timeout(200)
    return shown


class PeakRSS(threading.Thread):
    def __init__(self, pid):
        super().__init__(daemon=True)
        self.process, self.peak, self.running = psutil.Process(pid), 0, True

    def run(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.1)


def test_eight_sessions_each_get_their_sequential_replies(tmp_path):
    from playwright.sync_api import sync_playwright

    require_chromium()
    world = tiny_world(tmp_path, {"lora-a": {"max_steps": 2}, "lora-b": {"max_steps": 6, "learning_rate": 0.05}})
    with dashboard(world) as (url, proc), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        # What one session alone gets: a fresh page per prompt, one at a time.
        alone = {}
        for prompt in PROMPTS:
            page = browser.new_page()
            page.goto(url)
            _generate(page, prompt)
            page.get_by_text("tokens/s").nth(1).wait_for(timeout=REPLY_TIMEOUT_S * 1000)
            alone[prompt] = _replies(page)
            page.close()
        # The check below can only catch a mix-up if the adapters' replies differ from each other
        # and from one prompt to the next.
        assert all(a.strip() and b.strip() and a != b for a, b in alone.values()), alone
        assert len({a for a, _ in alone.values()}) == len(PROMPTS) == len({b for _, b in alone.values()}), alone
        rss_before = psutil.Process(proc.pid).memory_info().rss

        pages = [browser.new_page() for _ in range(SESSIONS)]
        for page in pages:
            page.goto(url)
            page.get_by_role("button", name="Generate").wait_for()
        monitor = PeakRSS(proc.pid)
        monitor.start()
        started = time.time()
        mismatches = []
        for r in range(ROUNDS):
            asked = [PROMPTS[(k + r) % len(PROMPTS)] for k in range(SESSIONS)]
            for page, prompt in zip(pages, asked):  # all eight generate at once on the server
                _generate(page, prompt)
            deadline = time.time() + REPLY_TIMEOUT_S
            for k, (page, prompt) in enumerate(zip(pages, asked)):
                shown = _wait_for(page, alone[prompt], deadline)
                if shown != alone[prompt]:
                    mismatches.append({"session": k, "round": r, "prompt": prompt, "shown": shown,
                                       "expected": alone[prompt]})
                assert page.locator('[data-testid="stException"]').count() == 0, f"session {k} shows an exception"
        seconds = time.time() - started
        monitor.running = False
        monitor.join()
        browser.close()

    peak_growth_mb = (monitor.peak - rss_before) / 2**20
    figures = {
        "sessions": SESSIONS,
        "rounds": ROUNDS,
        "generations": SESSIONS * ROUNDS * 2,
        "wall_s": round(seconds, 1),
        "server_rss_before_mb": round(rss_before / 2**20, 1),
        "server_peak_rss_mb": round(monitor.peak / 2**20, 1),
        "peak_growth_mb": round(peak_growth_mb, 1),
        "mismatches": len(mismatches),
    }
    out = tmp_path / "dashboard_load.json"  # tests never write into the checkout; the figures are also printed
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(figures)
    assert not mismatches, json.dumps(mismatches, indent=1, ensure_ascii=False)[:4000]
    assert peak_growth_mb < 500, figures
