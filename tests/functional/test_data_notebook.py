"""The data-prep notebook executed by papermill, as the pipeline runs it."""
import json

import nbformat
import pytest

from utils import pipeline
from utils.pipeline import Step

pytestmark = pytest.mark.slow


def _pairs(n):
    return [{"prompt": f"question {i}?", "response": f"answer {i}."} for i in range(n)]


def test_pipeline_runs_data_notebook_on_fixture(write_jsonl, tmp_path):
    src = write_jsonl("small.jsonl", _pairs(30) + ["not json"] + _pairs(3))
    out = tmp_path / "processed"
    steps = [Step("01_data_prep", "01_data_prep.ipynb",
                  {"input_path": str(src), "output_dir": str(out), "on_error": "skip", "seed": 7})]
    run_dir = pipeline.run(steps, tmp_path / "reports", progress=False)
    card = json.loads((out / "data_card.json").read_text())
    assert card["counts"]["total"] == 30 and card["duplicates_removed"]["exact"] == 3
    assert card["skipped_rows"] == [
        {
            "file": str(src),
            "line": 31,
            "reason": "invalid JSON (Expecting value at column 1); expected one JSON object per line",
        }
    ]
    assert (tmp_path / "reports" / "latest").resolve() == run_dir.resolve()
    executed = nbformat.read(run_dir / "01_data_prep.ipynb", as_version=4)
    text = json.dumps(executed)
    assert "Data card" in text and "image/png" in text
    state = json.loads((run_dir / "run.json").read_text())
    assert state["complete"] and state["steps"]["01_data_prep"]["status"] == "done"

    # a second start with unchanged inputs and parameters reuses the finished step
    again = pipeline.run(steps, tmp_path / "reports", progress=False, run_id="second")
    assert again.name == "second" and (tmp_path / "reports" / "latest").resolve() == again.resolve()
    state2 = json.loads((again / "run.json").read_text())
    assert state2["steps"]["01_data_prep"]["reused_from"] == run_dir.name
    assert (again / "01_data_prep.ipynb").exists()

    # changed input: the step runs again; --force: it runs again even when nothing changed
    with open(src, "a") as fh:
        fh.write(json.dumps({"prompt": "a new question?", "response": "a new answer."}) + "\n")
    third = pipeline.run(steps, tmp_path / "reports", progress=False, run_id="third")
    assert "reused_from" not in json.loads((third / "run.json").read_text())["steps"]["01_data_prep"]
    assert json.loads((out / "data_card.json").read_text())["counts"]["total"] == 31
    forced = pipeline.run(steps, tmp_path / "reports", progress=False, run_id="fourth", force=True)
    assert "reused_from" not in json.loads((forced / "run.json").read_text())["steps"]["01_data_prep"]


def test_bad_input_fails_the_run_with_the_message_in_the_notebook(write_jsonl, tmp_path):
    src = write_jsonl("bad.jsonl", _pairs(5) + ['{"prompt": "x"}'])
    out = tmp_path / "processed"
    out.mkdir()
    (out / "train.jsonl").write_text("previous\n")
    steps = [Step("01_data_prep", "01_data_prep.ipynb",
                  {"input_path": str(src), "output_dir": str(out), "on_error": "raise"})]
    with pytest.raises(pipeline.StepFailed) as err:
        pipeline.run(steps, tmp_path / "reports", progress=False, run_id="r1")
    assert "step 01_data_prep failed" in str(err.value)
    assert "bad.jsonl:6: missing required field 'response'" in str(err.value)
    executed = (tmp_path / "reports" / "r1" / "01_data_prep.ipynb").read_text()
    assert "bad.jsonl:6: missing required field" in executed
    assert (out / "train.jsonl").read_text() == "previous\n"
    state = json.loads((tmp_path / "reports" / "r1" / "run.json").read_text())
    assert state["steps"]["01_data_prep"]["status"] == "failed" and not state["complete"]
    assert not (tmp_path / "reports" / "latest").exists()


def test_cli_exits_non_zero_on_unknown_parameter(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  sed: 3\n")
    assert pipeline.main(["--config", str(cfg), "--reports-dir", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()


def test_cli_exits_non_zero_when_a_notebook_fails(write_jsonl, tmp_path, capsys):
    src = write_jsonl("bad.jsonl", ["[1, 2]"])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  input_path: {src}\n  output_dir: {tmp_path / 'out'}\n  on_error: raise\n")
    assert pipeline.main(["--config", str(cfg), "--reports-dir", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "step 01_data_prep failed" in err and "bad.jsonl:1: line is a JSON list, not an object" in err


def test_pipeline_killed_mid_step_resumes_and_latest_never_points_at_it(write_jsonl, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    src = write_jsonl("small.jsonl", _pairs(30))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  input_path: {src}\n  output_dir: {tmp_path / 'out'}\n")
    reports = tmp_path / "reports"
    cmd = [sys.executable, "-m", "utils.pipeline", "--config", str(cfg), "--reports-dir", str(reports)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    state_file = None
    while time.time() < deadline:
        found = list(reports.glob("*/run.json"))
        if found and '"running"' in found[0].read_text():
            state_file = found[0]
            break
        time.sleep(0.05)
    assert state_file is not None, "the step never started"
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and its kernel
    proc.wait()
    assert not (reports / "latest").exists()

    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming unfinished run {state_file.parent.name}" in done.stdout
    assert (reports / "latest").resolve() == state_file.parent.resolve()
    assert json.loads(state_file.read_text())["complete"] is True


def test_papermill_run_with_a_misspelt_parameter_stops_before_any_work(write_jsonl, tmp_path):
    import papermill

    src = write_jsonl("small.jsonl", _pairs(30))
    out = tmp_path / "processed"
    with pytest.raises(papermill.PapermillExecutionError) as err:
        papermill.execute_notebook(str(pipeline.NOTEBOOKS_DIR / "01_data_prep.ipynb"), str(tmp_path / "out.ipynb"),
                                   parameters={"input_path": str(src), "output_dir": str(out), "val_fracton": 0.3},
                                   cwd=str(pipeline.NOTEBOOKS_DIR), progress_bar=False)
    assert "unknown parameter(s) ['val_fracton']" in str(err.value) and "'val_fraction'" in str(err.value)
    assert not out.exists()
    papermill.execute_notebook(str(pipeline.NOTEBOOKS_DIR / "01_data_prep.ipynb"), str(tmp_path / "ok.ipynb"),
                               parameters={"input_path": str(src), "output_dir": str(out), "val_fraction": 0.2},
                               cwd=str(pipeline.NOTEBOOKS_DIR), progress_bar=False)
    assert (out / "train.jsonl").exists()


def test_a_plan_killed_after_step_2_redoes_nothing_of_steps_1_and_2(write_jsonl, tmp_path, capsys, monkeypatch):
    """Three steps; SIGKILL while the third runs; the restart resumes the same run, skips the two
    finished steps (the "done in an earlier attempt of this run" branch) and runs only the third."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import papermill

    src = write_jsonl("small.jsonl", _pairs(30))
    steps = [pipeline.Step(name, "01_data_prep.ipynb", {"input_path": str(src), "output_dir": str(tmp_path / name)})
             for name in ("first", "second", "third")]
    reports = tmp_path / "reports"
    script = ("import json, sys; from utils import pipeline; "
              "pipeline.run([pipeline.Step(**s) for s in json.loads(sys.argv[1])], reports_dir=sys.argv[2], "
              "progress=False)")
    plan = json.dumps([{"name": s.name, "notebook": s.notebook, "parameters": s.parameters} for s in steps])
    proc = subprocess.Popen([sys.executable, "-c", script, plan, str(reports)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline, state_file = time.time() + 300, None
    while time.time() < deadline and proc.poll() is None:
        found = list(reports.glob("*/run.json"))
        if found:
            try:
                state = json.loads(found[0].read_text())
            except ValueError:
                continue
            if state["steps"].get("third", {}).get("status") == "running":
                state_file = found[0]
                break
        time.sleep(0.02)
    assert state_file is not None, "the third step never started"
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and its kernel
    proc.wait()
    run_dir = state_file.parent
    kept = [run_dir / "first.ipynb", run_dir / "second.ipynb",
            tmp_path / "first" / "train.jsonl", tmp_path / "second" / "train.jsonl"]
    before = {p: p.stat().st_mtime_ns for p in kept}

    executed = []
    real = papermill.execute_notebook
    monkeypatch.setattr(papermill, "execute_notebook",
                        lambda inp, out, **kw: executed.append(out) or real(inp, out, **kw))
    capsys.readouterr()
    assert pipeline.run(steps, reports_dir=reports, progress=False) == run_dir
    out = capsys.readouterr().out
    assert f"resuming unfinished run {run_dir.name}" in out
    assert "[1/3] first: done in an earlier attempt of this run, skipped" in out
    assert "[2/3] second: done in an earlier attempt of this run, skipped" in out
    assert executed == [str(run_dir / "third.ipynb")]  # steps 1 and 2 were not run again
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nor their outputs rewritten
    state = json.loads(state_file.read_text())
    assert state["complete"] and [state["steps"][s.name]["status"] for s in steps] == ["done"] * 3
    assert (tmp_path / "third" / "train.jsonl").exists()
