"""What a brand-new machine waits for, measured and written to a file (not a timed test).

- ``test``: a fresh clone of this repository's HEAD (no ``.venv``), with ``LORA_COMPARE_CACHE`` set to a
  new, empty folder, runs what ``make test`` runs, one make target at a time so each phase is timed:
  ``make venv`` (the packages from the registry), ``make lint``, ``make safety`` (the safety classifiers'
  fast paths), then ``make test`` itself (pytest; lint and safety are then up to date).
- ``app``: in that clone (its venv built), with another new, empty cache, ``make app`` (the safety fit, then
  ``streamlit run``); a headless Chromium opens the dashboard, types a prompt and clicks Generate; the
  figure is the time from ``make app`` to both replies on the page.

    python -m utils.coldstart test [--out FILE] [--workdir DIR]
    python -m utils.coldstart app --workdir DIR [--out FILE]      # DIR: a clone that ``test`` left behind

Each writes (or adds its part to) ``--out`` (default ``reports/benchmarks/cold_start.json``) with the
CPU it ran on. Budgets (issue 36): ``make test`` cold within 40 min on a 2-core AVX2-only CPU and 25 min
on a 2-core AVX-512-BF16 one; the dashboard's first answer within 3 min.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

from .paths import ROOT

DEFAULT_OUT = ROOT / "reports" / "benchmarks" / "cold_start.json"
BUDGET_MIN = {"make test, AVX2 only": 40, "make test, AVX-512-BF16": 25, "dashboard first answer": 3}
PROMPT = "I've been feeling anxious lately. Any tips?"
# A headless Debian Chromium for Playwright (also the browser tests')
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def _machine() -> dict:
    from .hardware import cpu_summary

    return {**cpu_summary(), "cores": os.cpu_count()}


def _write(out: Path, part: str, value: dict) -> None:
    """Add ``value`` as ``part`` of ``out`` (other parts kept), with the machine it ran on."""
    found = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else {}
    found.update({"machine": _machine(), "budgets_min": BUDGET_MIN, part: value})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(found, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")


def _env(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "LORA_COMPARE_"))}
    # no pip cache either: a brand-new machine downloads every package from the registry
    return {**env, "LORA_COMPARE_CACHE": str(cache), "PYTHONUNBUFFERED": "1", "PIP_NO_CACHE_DIR": "1"}


def _timed(cmd: list[str], cwd: Path, env: dict, log: Path) -> tuple[float, int]:
    start = time.perf_counter()
    print(f"$ {' '.join(cmd)}  (log: {log})", flush=True)
    with open(log, "a", encoding="utf-8") as f:
        rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    seconds = round(time.perf_counter() - start, 1)
    print(f"  {seconds:.0f} s, exit {rc}", flush=True)
    return seconds, rc


def cold_test(workdir: Path, out: Path) -> dict:
    """Clone HEAD into ``workdir/clone`` and run ``make test``'s phases there with an empty cache."""
    clone, cache, log = workdir / "clone", workdir / "cache-test", workdir / "make-test.log"
    if clone.exists():
        raise SystemExit(f"{clone} exists: pass a new --workdir")
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    cache.mkdir(parents=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
    env, phases, rc = _env(cache), {}, 0
    for target in ("venv", "lint", "safety", "test"):
        phases[target], rc = _timed(["make", target], clone, env, log)
        if rc:
            break
    text = log.read_text(encoding="utf-8", errors="replace")
    summary = re.findall(r"^=+ (.*(?:passed|failed|error).*) in [\d.]+s", text, re.M)
    result = {"commit": commit, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "phases_s": phases, "total_min": round(sum(phases.values()) / 60, 1), "exit": rc,
              "pytest": summary[-1] if summary else None,
              "log": f"{log.name} in the work folder"}
    _write(out, "make_test_cold", result)
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cold_app(workdir: Path, out: Path, timeout: float = 900) -> dict:
    """``make app`` in ``workdir/clone`` with a new, empty cache; the time until a headless Chromium
    sees both replies to ``PROMPT``."""
    clone, cache, log = workdir / "clone", workdir / "cache-app", workdir / "make-app.log"
    if not (clone / ".venv" / ".installed").exists():
        raise SystemExit(f"{clone}: no built venv; run `python -m utils.coldstart test --workdir {workdir}` first")
    from playwright.sync_api import sync_playwright
    cache.mkdir(parents=True, exist_ok=False)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    marks = {}
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.Popen(["make", "app", f"ARGS=--server.headless true --server.port {port} "
                                 "--server.address 127.0.0.1 --browser.gatherUsageStats false"],
                                cwd=clone, env=_env(cache), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while True:
            try:
                urllib.request.urlopen(url + "/_stcore/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.perf_counter() - start > timeout:
                    raise SystemExit(f"the dashboard did not start; see {log}") from None
                time.sleep(0.5)
        marks["server_up_s"] = round(time.perf_counter() - start, 1)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(url)
            box = page.get_by_role("textbox", name="Prompt")
            box.wait_for(timeout=timeout * 1000)
            marks["page_ready_s"] = round(time.perf_counter() - start, 1)
            box.fill(PROMPT)
            page.keyboard.press("Control+Enter")
            page.get_by_role("button", name="Generate").click()
            page.get_by_text("tokens/s").nth(1).wait_for(timeout=timeout * 1000)
            marks["first_answer_s"] = round(time.perf_counter() - start, 1)
            page.screenshot(path=str(workdir / "first_answer.png"), full_page=True)
            replies = [page.locator(f".st-key-reply_{side}").inner_text() for side in "AB"]
            browser.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "prompt": PROMPT, **marks,
              "within_budget": marks["first_answer_s"] <= 60 * BUDGET_MIN["dashboard first answer"],
              "replies": replies, "venv": "built before (its time is make_test_cold's venv phase)",
              "screenshot": "first_answer.png in the work folder", "log": f"{log.name} in the work folder"}
    _write(out, "dashboard_first_answer", result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.coldstart", description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["test", "app"])
    parser.add_argument("--workdir", help="where the clone and the empty caches go (default: a new temporary folder)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="the JSON file to write (default: %(default)s)")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="lora-compare-cold-"))
    workdir.mkdir(parents=True, exist_ok=True)
    result = (cold_test if args.what == "test" else cold_app)(workdir, Path(args.out))
    print(json.dumps(result, indent=1))
    return 0 if result.get("exit", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
