"""The cold-start measurement tool: what it writes (the measurement itself is `python -m utils.coldstart`)."""
import json

import pytest

from utils import coldstart


def test_each_measurement_is_added_to_the_file_with_the_machine(tmp_path):
    out = tmp_path / "deep" / "cold.json"
    coldstart._write(out, "make_test_cold", {"total_min": 31.5})
    coldstart._write(out, "dashboard_first_answer", {"first_answer_s": 95.0})
    saved = json.loads(out.read_text())
    assert saved["make_test_cold"] == {"total_min": 31.5} and saved["dashboard_first_answer"]["first_answer_s"] == 95
    assert saved["machine"]["cores"] >= 1 and "cpu" in json.dumps(saved["machine"]).lower()
    assert saved["budgets_min"]["dashboard first answer"] == 3


def test_the_clone_gets_an_empty_cache_and_no_venv_of_ours(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_COMPARE_CACHE", "/somewhere/warm")
    monkeypatch.setenv("VIRTUAL_ENV", "/work/.venv")
    env = coldstart._env(tmp_path / "empty")
    assert env["LORA_COMPARE_CACHE"] == str(tmp_path / "empty") and "VIRTUAL_ENV" not in env
    assert env["PIP_NO_CACHE_DIR"] == "1"


def test_app_needs_the_clone_that_the_test_run_built(tmp_path):
    with pytest.raises(SystemExit, match="no built venv"):
        coldstart.cold_app(tmp_path, tmp_path / "out.json")
