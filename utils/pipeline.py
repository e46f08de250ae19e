"""The papermill pipeline: run the numbered notebooks in order into ``reports/<run-id>/``.

    python -m utils.pipeline                      # configs/pipeline.yaml, resumes an unfinished run
    python -m utils.pipeline --force              # a new run, every step redone
    python -m utils.pipeline --config my.yaml --quick

Each step is a notebook plus parameters. A run's state lives in ``reports/<run-id>/run.json``;
a run that stopped half-way is resumed from its first unfinished step when the same plan is
started again. ``reports/latest`` points at the newest complete run only.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path


from .io import point_symlink, read_yaml, write_json_atomically
from .params import QUICK, QUICK_SUBDIR, notebook_parameters
from .paths import (CONFIGS_DIR, MODELS, NOTEBOOKS_DIR, REPORTS_DIR, adapter_folder, adapter_root, final_adapter,
                    from_root, shown)

DEFAULT_CONFIG = CONFIGS_DIR / "pipeline.yaml"
# config section -> notebook it parameterises
SECTIONS = {"data": "01_data_prep.ipynb", "train": "02_train_lora.ipynb", "preference": "06_preference.ipynb",
            "evaluate": "03_evaluate.ipynb", "benchmark": "04_benchmark.ipynb"}
# sections that are not notebook parameters
META_SECTIONS = ("models", "train_per_model", "models_dir")
class PipelineError(RuntimeError):
    pass


@dataclass
class Step:
    name: str
    notebook: str
    parameters: dict = field(default_factory=dict)


def check_parameters(step: Step, source: str) -> None:
    """Refuse parameter names the notebook does not declare, listing the valid ones."""
    valid = notebook_parameters(step.notebook)
    unknown = sorted(set(step.parameters) - set(valid))
    if unknown:
        raise PipelineError(f"{source}: unknown parameter(s) {unknown} for {step.notebook}; "
                            f"valid parameters: {sorted(valid)}")


def load_config(path: str | Path = DEFAULT_CONFIG) -> dict:
    path = Path(path)
    config = read_yaml(path, "the pipeline config file", PipelineError) or {}
    if not isinstance(config, dict):
        raise PipelineError(f"{path}: expected a mapping of sections {sorted(SECTIONS)}")
    valid = sorted(SECTIONS) + list(META_SECTIONS)
    unknown = sorted(set(config) - set(valid))
    if unknown:
        raise PipelineError(f"{path}: unknown section(s) {unknown}; valid sections: {valid}")
    for section, params in config.items():
        if section == "models":
            if not isinstance(params, list) or not all(isinstance(m, str) for m in params):
                raise PipelineError(f"{path}: 'models' must be a list of model names")
        elif section == "models_dir":
            if not isinstance(params, str):
                raise PipelineError(f"{path}: 'models_dir' must be a folder path")
        elif not isinstance(params, dict):
            raise PipelineError(f"{path}: section '{section}' must be a mapping of notebook parameters")
    return config


def plan(config: dict, quick: bool = False, source: str = "config", models: list[str] | None = None) -> list[Step]:
    """The ordered steps for a config. ``quick`` shrinks every step to a smoke-test size;
    ``models`` overrides the config's list."""
    data = dict(config.get("data", {}))
    steps = [Step("01_data_prep", SECTIONS["data"], data)]
    per_model = config.get("train_per_model", {}) or {}
    unknown = sorted(set(per_model) - set(config.get("models", [])))
    if unknown:
        raise PipelineError(f"{source}: train_per_model names {unknown}, which are not in models "
                            f"{config.get('models', [])}")
    models = models if models is not None else config.get("models", [])
    for model in models:
        check_model_name(model, source)
    models_dir = config.get("models_dir", MODELS) + (f"/{QUICK_SUBDIR}" if quick else "")
    data_dir = data.get("output_dir", notebook_parameters(SECTIONS["data"])["output_dir"])
    for model in models:
        params = {"data_dir": data_dir, **config.get("train", {}), **(per_model.get(model) or {}), "model": model}
        if quick:
            params.update(QUICK[SECTIONS["train"]])
        if quick or "models_dir" in config:
            params["output_dir"] = f"{models_dir}/{adapter_folder(resolve_name(model))}"
        steps.append(Step(f"02_train_lora-{resolve_name(model)}", SECTIONS["train"], params))
    if "preference" in config:  # DPO on top of each SFT adapter (a third variant per model in the evaluation)
        for model in models:
            params = {"data_dir": data_dir, **(config.get("preference") or {}), "model": model,
                      "models_dir": models_dir}
            if quick:
                params.update(QUICK[SECTIONS["preference"]])
            steps.append(Step(f"06_preference-{resolve_name(model)}", SECTIONS["preference"], params))
    for section, name in (("evaluate", "03_evaluate"), ("benchmark", "04_benchmark")):
        if section not in config and not models:
            continue
        params = {**config.get(section, {}), "models": list(models), "models_dir": models_dir}
        if section == "evaluate":
            params.setdefault("data_dir", data_dir)
        if quick:  # the smoke-test sizes, but the models are the config's (the ones trained above)
            params.update({k: v for k, v in QUICK[SECTIONS[section]].items() if k != "models"})
        steps.append(Step(name, SECTIONS[section], params))
    for step in steps:
        check_parameters(step, f"{source} [{step.name}]")
    return steps


def check_model_name(model: str, source: str = "config") -> None:
    """Models are presets, Hugging Face ids, or folders inside the repository's models/ (after
    resolving symlinks); anything else is refused."""
    from .models import presets
    from .paths import MODELS_DIR, ROOT

    if model in presets():
        return
    path = Path(model).expanduser()
    path = path if path.is_absolute() else ROOT / path
    if path.exists() or model.startswith((".", "/", "~")):
        try:
            path.resolve().relative_to(MODELS_DIR.resolve())
        except ValueError:
            raise PipelineError(f"{source}: model path {model} is outside {MODELS_DIR}; use a preset "
                                f"{sorted(presets())}, a Hugging Face id, or a folder under models/") from None


def resolve_name(model: str) -> str:
    from .models import resolve

    return resolve(model)["name"]


def param(step: Step, name: str):
    """A step's parameter: as the plan sets it, else the notebook's own default."""
    return step.parameters[name] if name in step.parameters else notebook_parameters(step.notebook)[name]


def train_output(step: Step) -> Path:
    """Where a training step writes its run folder (``output_dir``, default ``<models>/<name>-lora``)."""
    out = param(step, "output_dir")
    return from_root(out) if out else adapter_root(resolve_name(param(step, "model")))


def _fingerprint(steps: list[Step]) -> str:
    return hashlib.sha1(json.dumps([asdict(s) for s in steps], sort_keys=True, default=str).encode()).hexdigest()[:12]


def _read_state(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return None


def _write_state(run_dir: Path, state: dict) -> None:
    write_json_atomically(run_dir / "run.json", state)


def find_unfinished_run(reports_dir: Path, fingerprint: str) -> Path | None:
    """Newest run directory with the same plan that has not finished."""
    if not reports_dir.exists():
        return None
    runs = sorted((p for p in reports_dir.iterdir() if p.is_dir() and not p.is_symlink()), reverse=True)
    for run_dir in runs:
        state = _read_state(run_dir)
        if state and state.get("fingerprint") == fingerprint and not state.get("complete"):
            return run_dir
    return None


def point_latest(reports_dir: Path, run_dir: Path) -> None:
    """Atomically repoint ``reports/latest`` (a relative symlink) at ``run_dir``."""
    point_symlink(reports_dir / "latest", run_dir.name)


def finish_report(run_dir: Path, steps: list[Step]) -> None:
    """Copy the data and model cards into the run folder and build metrics.json + report.html."""
    from .paths import from_root
    from .report import build_report

    cards = run_dir / "cards"
    cards.mkdir(exist_ok=True)
    for step in steps:
        p = step.parameters
        if step.notebook == SECTIONS["data"]:
            card = from_root(param(step, "output_dir")) / "data_card.md"
            if card.exists():
                shutil.copyfile(card, cards / "0_data_card.md")
        elif step.notebook == SECTIONS["train"]:
            out = train_output(step)
            if (out / "MODEL_CARD.md").exists():
                shutil.copyfile(out / "MODEL_CARD.md", cards / f"1_model_card-{resolve_name(p['model'])}.md")
        elif step.notebook == SECTIONS["preference"]:
            from .dpo import dpo_root

            out = from_root(param(step, "output_dir")) if param(step, "output_dir") else dpo_root(
                resolve_name(p["model"]), param(step, "models_dir"))
            if (out / "MODEL_CARD.md").exists():
                shutil.copyfile(out / "MODEL_CARD.md", cards / f"2_model_card-{resolve_name(p['model'])}-dpo.md")
    build_report(run_dir)
    print(f"report: {run_dir / 'report.html'}", flush=True)


SAFETY_STEP = "safety_classifiers"


def fit_safety(state: dict, run_dir: Path, command: list[str] | None = None) -> None:
    """The safety classifiers (the crisis flags of the evaluation), fitted as a named, timed step of
    their own before the evaluation, in a child process that shows the fit's progress and frees its
    memory: once per machine (tens of minutes on 2 cores), seconds when the per-machine cache holds
    them. Recorded in the run's state like a notebook step."""
    import subprocess

    from . import safety
    from .paths import ROOT

    already = safety.fitted()
    print(f"[safety] {'loading the' if already else 'fitting the'} safety classifiers (python -m utils.safety fit"
          + ("" if already else "; once per machine, tens of minutes on 2 cores") + ") ...", flush=True)
    start = time.perf_counter()
    state["steps"][SAFETY_STEP] = {"status": "running", "already_fitted": already}
    _write_state(run_dir, state)
    code = subprocess.run(command or [sys.executable, "-m", "utils.safety", "fit"], cwd=ROOT).returncode
    seconds = round(time.perf_counter() - start, 2)
    state["steps"][SAFETY_STEP] = {"status": "done" if code == 0 else "failed", "already_fitted": already,
                                   "seconds": seconds}
    _write_state(run_dir, state)
    if code != 0:
        raise PipelineError(f"step {SAFETY_STEP} failed (python -m utils.safety fit exited with {code}); its "
                            "messages are above")
    print(f"[safety] done in {seconds:.1f}s", flush=True)


class StepFailed(RuntimeError):
    def __init__(self, step: str, notebook: Path, error: BaseException):
        self.step, self.notebook = step, notebook
        super().__init__(f"step {step} failed; its output notebook with the error: {notebook}\n{error}")


def _file_digest(path: Path) -> str:
    if not path.is_file():
        return "missing"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _adapter_files(step: Step, dpo: bool = False) -> list[Path]:
    """The adapters a step reads: each model's SFT adapter, and with ``dpo`` its DPO adapter where
    there is one (the evaluation compares it; the benchmark does not time it: same shape as SFT)."""
    from .dpo import dpo_root

    models_dir = param(step, "models_dir")
    out = []
    for m in param(step, "models"):
        out.append(final_adapter(adapter_root(resolve_name(m), models_dir)) / "adapter_model.safetensors")
        tuned = final_adapter(dpo_root(resolve_name(m), models_dir)) / "adapter_model.safetensors"
        if dpo and tuned.exists():
            out.append(tuned)
    return out


def step_inputs(step: Step) -> list[Path]:
    """Files whose content decides a step's result (besides its notebook and parameters)."""
    from .paths import input_paths

    if step.notebook == SECTIONS["data"]:
        from .data import resolve_inputs

        try:
            return resolve_inputs(input_paths(param(step, "input_path")))
        except Exception:  # noqa: BLE001 - the notebook itself reports bad inputs
            return []
    if step.notebook == SECTIONS["train"]:
        data_dir = from_root(param(step, "data_dir"))
        return [data_dir / "train.jsonl", data_dir / "validation.jsonl"]
    if step.notebook == SECTIONS["preference"]:
        from .preferences import default_pairs_path

        data_dir = from_root(param(step, "data_dir"))
        sft = final_adapter(adapter_root(resolve_name(param(step, "model")), param(step, "models_dir")))
        given = param(step, "pairs_path")  # trained on as it is when the step does not make the pairs
        pairs = [] if param(step, "export_pairs") else [from_root(given) if given else
                                                        default_pairs_path(param(step, "model"))]
        return [data_dir / "train.jsonl", sft / "adapter_model.safetensors",
                from_root(param(step, "ratings_db"))] + pairs
    if step.notebook == SECTIONS["evaluate"]:
        data_dir = from_root(param(step, "data_dir"))
        return ([data_dir / f"{param(step, 'split')}.jsonl", data_dir / "validation.jsonl"]
                + _adapter_files(step, dpo=True))
    return _adapter_files(step)


def step_key(step: Step) -> str:
    digest = hashlib.sha256((NOTEBOOKS_DIR / step.notebook).read_bytes())
    digest.update(json.dumps(step.parameters, sort_keys=True, default=str).encode())
    for path in step_inputs(step):
        digest.update(f"{path}:{_file_digest(path)}".encode())
    return digest.hexdigest()[:16]


def external_outputs_present(step: Step) -> bool:
    """What a step leaves outside the run folder is still there (data splits, adapters)."""
    if step.notebook == SECTIONS["data"]:
        return (from_root(param(step, "output_dir")) / "data_card.json").exists()
    if step.notebook == SECTIONS["train"]:
        return (final_adapter(train_output(step)) / "adapter_model.safetensors").exists()
    if step.notebook == SECTIONS["preference"]:
        from .dpo import dpo_root

        out = param(step, "output_dir")
        root = from_root(out) if out else dpo_root(resolve_name(param(step, "model")), param(step, "models_dir"))
        return (final_adapter(root) / "adapter_model.safetensors").exists()
    return True


def find_reusable(reports_dir: Path, run_dir: Path, step: Step, key: str) -> tuple[Path, dict] | None:
    """The newest earlier run in which this step finished with the same key, outputs intact."""
    if not external_outputs_present(step):
        return None
    for other in sorted((p for p in reports_dir.iterdir() if p.is_dir() and not p.is_symlink() and p != run_dir),
                        reverse=True):
        prev = (_read_state(other) or {}).get("steps", {}).get(step.name)
        if (
            prev
            and prev.get("status") == "done"
            and prev.get("key") == key
            and (other / f"{step.name}.ipynb").exists()
            and all((other / rel).exists() for rel in prev.get("artifacts", []))
        ):
            return other, prev
    return None


def _snapshot(run_dir: Path) -> dict[str, float]:
    return {str(p.relative_to(run_dir)): p.stat().st_mtime for p in run_dir.rglob("*")
            if p.is_file() and p.name != "run.json"}


def run(steps: list[Step], reports_dir: Path = REPORTS_DIR, force: bool = False, run_id: str | None = None,
        kernel_name: str | None = None, progress: bool = True, safety_command: list[str] | None = None) -> Path:
    """Execute ``steps`` with papermill; return the run directory. Before the evaluation the safety
    classifiers are fitted as a step of their own (``safety_command``: the command that does it,
    default ``python -m utils.safety fit``; ``[]`` leaves it to the evaluation)."""
    import papermill

    reports_dir = Path(reports_dir)
    reports_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(steps)
    run_dir = None if (force or run_id) else find_unfinished_run(reports_dir, fingerprint)
    if run_dir is None:
        run_id = run_id or datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        run_dir = reports_dir / run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        state = {"schema": 1, "run_id": run_dir.name, "fingerprint": fingerprint, "complete": False,
                 "started": datetime.now(timezone.utc).isoformat(), "steps": {}}
    else:
        state = _read_state(run_dir)
        print(f"resuming unfinished run {run_dir.name}", flush=True)
    state["plan"] = [asdict(s) for s in steps]
    _write_state(run_dir, state)

    for i, step in enumerate(steps, start=1):
        key = step_key(step)
        output = run_dir / f"{step.name}.ipynb"
        done = state["steps"].get(step.name, {})
        if not force and done.get("status") == "done" and done.get("key") == key and output.exists() \
                and external_outputs_present(step):
            print(f"[{i}/{len(steps)}] {step.name}: done in an earlier attempt of this run, skipped", flush=True)
            continue
        earlier = None if force else find_reusable(reports_dir, run_dir, step, key)
        if earlier is not None:
            prev_dir, prev = earlier
            for rel in [f"{step.name}.ipynb"] + prev.get("artifacts", []):
                (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(prev_dir / rel, run_dir / rel)
            state["steps"][step.name] = {**prev, "reused_from": prev_dir.name}
            _write_state(run_dir, state)
            print(f"[{i}/{len(steps)}] {step.name}: inputs and parameters unchanged since run {prev_dir.name}, "
                  "reused (--force reruns)", flush=True)
            continue
        if step.notebook == SECTIONS["evaluate"] and safety_command != []:
            fit_safety(state, run_dir, safety_command)
        print(f"[{i}/{len(steps)}] {step.name} ...", flush=True)
        start = time.perf_counter()
        before = _snapshot(run_dir)
        state["steps"][step.name] = {"status": "running", "notebook": step.notebook, "key": key}
        _write_state(run_dir, state)
        parameters = dict(step.parameters)
        if "report_dir" in notebook_parameters(step.notebook):
            parameters.setdefault("report_dir", shown(run_dir))  # figures and tables land beside the notebooks
        try:
            papermill.execute_notebook(
                str(NOTEBOOKS_DIR / step.notebook), str(output), parameters=parameters,
                kernel_name=kernel_name, cwd=str(NOTEBOOKS_DIR), progress_bar=progress, log_output=progress,
            )
        except BaseException as err:
            state["steps"][step.name] = {"status": "failed", "notebook": step.notebook, "key": key,
                                         "seconds": round(time.perf_counter() - start, 2),
                                         "error": str(err).strip()[-2000:]}
            _write_state(run_dir, state)
            raise StepFailed(step.name, output, err) from err
        seconds = time.perf_counter() - start
        after = _snapshot(run_dir)
        artifacts = sorted(rel for rel, mtime in after.items() if before.get(rel) != mtime and rel != output.name)
        state["steps"][step.name] = {"status": "done", "notebook": step.notebook, "key": key,
                                     "seconds": round(seconds, 2), "artifacts": artifacts}
        _write_state(run_dir, state)
        print(f"[{i}/{len(steps)}] {step.name}: done in {seconds:.1f}s", flush=True)

    finish_report(run_dir, steps)
    state["complete"] = True
    state["finished"] = datetime.now(timezone.utc).isoformat()
    _write_state(run_dir, state)
    point_latest(reports_dir, run_dir)
    total = sum(s.get("seconds", 0) for s in state["steps"].values())
    print(f"run {run_dir.name} complete ({total:.1f}s of steps); reports/latest -> {run_dir.name}", flush=True)
    return run_dir


def describe(steps: list[Step]) -> str:
    """Each step with every parameter it will run with; ``*`` marks those the plan sets, the rest
    are the notebook's defaults."""
    lines = []
    for step in steps:
        lines.append(f"{step.name} ({step.notebook})")
        for name in notebook_parameters(step.notebook):
            mark = "*" if name in step.parameters else " "
            lines.append(f"  {mark} {name} = {param(step, name)!r}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML file of notebook parameters per section")
    parser.add_argument("--force", action="store_true", help="start a new run and redo every step")
    parser.add_argument("--quick", action="store_true", help="tiny smoke-test sizes for every step")
    parser.add_argument("--run-id", help="name of the run directory under reports/ (default: UTC timestamp)")
    parser.add_argument("--reports-dir", default=str(REPORTS_DIR))
    parser.add_argument("--models", nargs="+", help="models to train and compare (default: the config's list)")
    parser.add_argument("--preference", action="store_true",
                        help="add preference tuning (notebooks/06_preference.ipynb: DPO on top of each SFT adapter, "
                             "judged as a third variant) with the config's preference section, else its defaults")
    parser.add_argument("--kernel", default=None, help="Jupyter kernel (default: the notebooks' own, lora-compare)")
    parser.add_argument("--show", action="store_true",
                        help="print every step's parameters (* = set by the config, else the notebook's default) "
                             "and stop")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        if args.preference:
            config.setdefault("preference", {})
        steps = plan(config, quick=args.quick, source=args.config, models=args.models)
        if args.show:
            print(describe(steps))
            return 0
        run(steps, Path(args.reports_dir), force=args.force, run_id=args.run_id, kernel_name=args.kernel)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except StepFailed as err:  # papermill's error already holds the notebook's traceback
        print(f"error: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
