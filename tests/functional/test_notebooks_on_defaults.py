"""Every notebook, run the way JupyterLab's "Run All" runs it (nbclient, the notebook's own
parameters, no papermill), in order, on a copy of the repository's tracked files, i.e. a fresh
clone: no error, and every figure the notebook makes shown inline. LORA_COMPARE_QUICK=1 shrinks the
sizes the way `--quick` does (a full default run takes hours on two cores)."""
import subprocess
import time

import nbformat
import pytest
from nbclient import NotebookClient

from utils import params
from utils.paths import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3000)]
KERNEL = "lora-compare"  # installed into the virtual environment by `make venv`


def _fresh_copy(dest):
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src, dst = ROOT / rel, dest / rel
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
    return dest


def _images(nb) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
               for out in cell.get("outputs", []))


def _text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            parts.append(out.get("text", ""))
            parts += [v for k, v in out.get("data", {}).items() if k in ("text/plain", "text/markdown")]
    return "\n".join(parts)


def test_every_notebook_runs_top_to_bottom_on_its_own_defaults(tmp_path, monkeypatch, capsys):
    repo = _fresh_copy(tmp_path / "clone")
    # the kernel imports `utils` from the copy (its paths then point into the copy), not from this checkout
    monkeypatch.setenv("PYTHONPATH", str(repo))
    monkeypatch.setenv(params.QUICK_ENV, "1")
    seconds = {}
    for name in sorted(params.CONFIGS):
        nb = nbformat.read(repo / "notebooks" / name, as_version=4)
        start = time.perf_counter()
        NotebookClient(nb, kernel_name=KERNEL, timeout=1200,
                       resources={"metadata": {"path": str(repo / "notebooks")}}).execute()
        seconds[name] = round(time.perf_counter() - start)
        with capsys.disabled():  # the CI log shows where this test's time goes, notebook by notebook
            print(f"\n  {name}: {seconds[name]} s", flush=True)
        nbformat.write(nb, tmp_path / name)  # kept for reading when an assertion below fails
        text = _text(nb)
        assert f"{params.QUICK_ENV}=1: smoke-test sizes" in text, name
        assert _images(nb) >= 1, f"{name}: no figure shown inline"
        assert "## What this run showed" in "".join(c.source for c in nb.cells if c.cell_type == "markdown")
    print(f"seconds per notebook: {seconds}")
    # everything was written into the copy, where a fresh clone would write it
    assert (repo / "data" / "processed" / "train.jsonl").exists()
    assert (repo / "models" / "quick" / "smollm2-135m-lora" / "final" / "adapter_model.safetensors").exists()


def test_a_notebook_run_before_its_inputs_exist_names_the_notebook_to_run_first(tmp_path, monkeypatch):
    repo = _fresh_copy(tmp_path / "clone")
    monkeypatch.setenv("PYTHONPATH", str(repo))
    for name in ("02_train_lora.ipynb", "03_evaluate.ipynb"):
        nb = nbformat.read(repo / "notebooks" / name, as_version=4)
        client = NotebookClient(nb, kernel_name=KERNEL, timeout=600,
                                resources={"metadata": {"path": str(repo / "notebooks")}})
        with pytest.raises(Exception) as err:
            client.execute()
        assert "run notebooks/01_data_prep.ipynb first (no data/processed/" in str(err.value), name
