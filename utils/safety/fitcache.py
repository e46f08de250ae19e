"""Where the fits are kept: the fast path's per-machine cache folder, keyed by its rows, code and library
versions (``_cache_folder``); the second stages shipped with the repository (``SHIPPED_FIT``) and how a
saved one is read (``_read_stage``); and writing aside, so a half-written fit is never read."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..paths import DATA_DIR, shown
from .classifiers import TextClassifier, _auc, _cv_scores, embed
from .settings import MAX_FP_CV

def _rows_key(train: list[dict]) -> str:
    return hashlib.sha256(json.dumps([[r["text"], r["kind"], r["label"]] for r in train]).encode()).hexdigest()[:16]


def _fast_code() -> str:
    """What the fast path's fit computes: the code of the classifier, the embedding and the cross-validation."""
    from .. import store
    from ..metrics import Embedder

    return store.objects_key(TextClassifier, embed, _cv_scores, Embedder)


def _cache_folder(name: str, train: list[dict]) -> Path:
    """Where the fast path's fit is kept on this machine: keyed by its training rows, the code that
    fits it (``_fast_code``) and the library versions, so a change to any of them fits afresh (about
    a minute on 2 AVX2 cores) and an unchanged set loads in seconds."""
    import sklearn
    import torch
    import transformers

    from ..models import cache_dir

    key = json.dumps({"rows": _rows_key(train), "code": _fast_code(), "max_fp": MAX_FP_CV,
                      "libraries": [sklearn.__version__, torch.__version__, transformers.__version__]})
    return cache_dir() / "safety" / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


# The second stage's fit (the rule, the question's scores on the train rows, the probe) ships with the
# repository, one small JSON file per cascade: it reads every train text with the 1.5B judge (about
# 25 minutes on 2 AVX2 cores in fp32), which a brand-new machine should not wait for. Each file holds the
# key it was fitted under (train rows, code, screen prompts, grids); a file whose key differs from the
# current one is not used: the stage is fitted on this machine instead (named, with progress) and
# ``python -m utils.safety fit --ship`` writes the file again. A test keeps the shipped files current.
SHIPPED_FIT = DATA_DIR / "safety_fit"


def _stage_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _read_stage(path: Path) -> dict:
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if not {"key", "rules", "probe"} <= set(saved):
            raise ValueError("expected the keys key, rules and probe")
        return saved
    except (OSError, ValueError) as err:
        raise RuntimeError(f"{shown(path)}: the saved second stage of the safety classifiers cannot be read "
                           f"({type(err).__name__}: {err}); delete it and run `make safety` to fit it again") from err


def _write_aside(path: Path, write) -> None:
    """``write(tmp)`` then rename ``tmp`` to ``path``: a half-written file or folder is never read."""
    import os
    import shutil

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    write(tmp)
    try:
        os.replace(tmp, path)
    except OSError:  # another process saved the same thing first
        shutil.rmtree(tmp, ignore_errors=True)


def _cached(folder: Path | None, fit, models: dict):
    """``(meta, fitted models)``: loaded from ``folder`` when it holds them (``models`` maps each
    name to its class), else ``fit()`` (which returns meta and the fitted models by name) and saved
    there (written aside, then renamed into place, so a half-written fit is never loaded)."""
    if folder is not None and (folder / "meta.json").exists():
        try:
            meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
            return meta, {name: kind.load(folder / name) for name, kind in models.items()}
        except Exception as err:  # a damaged cache is not refitted over silently: say where and what to do
            raise RuntimeError(f"{folder}: the saved safety classifier cannot be read ({type(err).__name__}: {err}); "
                               f"delete that folder and run `make safety` to fit it again") from err
    meta, fitted = fit()
    if folder is not None:
        def write(tmp: Path) -> None:
            for name, model in fitted.items():
                model.save(tmp / name)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")

        _write_aside(folder, write)
    return meta, fitted


def _cv_summary(scores: np.ndarray, y: np.ndarray) -> dict:
    return {"auc": {"fast path": _auc(scores, y)}, "out_of_fold": [round(float(x), 6) for x in scores]}
