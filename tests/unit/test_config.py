"""The test run's own guarantees: the per-test time limit cannot be dropped silently, and the
lint that `make test` runs is configured where the README says."""
import subprocess
import sys
import tomllib

from utils.paths import ROOT


def test_the_900_s_limit_is_active(request):
    assert request.config.pluginmanager.hasplugin("timeout")
    assert float(request.config.getini("timeout")) == 900


def test_without_pytest_timeout_the_run_stops_instead_of_dropping_the_limit():
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:timeout",
                           "tests/unit/test_config.py"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "Unknown config option: timeout" in proc.stdout + proc.stderr


def test_make_test_lints_first_with_the_declared_line_length():
    makefile = (ROOT / "Makefile").read_text()
    # lint first; the full suite then fits (or loads) the safety classifiers outside any test's time limit
    assert "\ntest: lint safety\n" in makefile and "\ntest-fast: lint\n" in makefile
    assert "\nsafety: $(STAMP)\n\t$(PY) -m utils.safety fit\n" in makefile
    assert "ruff check ." in makefile and "utils.params --check" in makefile
    ruff = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]
    assert ruff["line-length"] == 120 and {"E", "F", "W"} <= set(ruff["lint"]["select"])
    from utils import params

    assert params.LINE_LENGTH == ruff["line-length"]  # the generated parameters cells wrap at the same width
