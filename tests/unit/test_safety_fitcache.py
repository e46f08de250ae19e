"""Safety, where the fits are kept and whether they are current (utils/safety/fitcache.py,
utils/safety/upkeep.py): the cache keys cover the code that fits, the shipped second stages match the
current data and code, a fit is loaded from its cache rather than redone, and pruning removes only the
fits of earlier data."""
import json

import numpy as np
import pytest
from safety_cases import EXAMPLE, TOY

from utils import safety


def test_the_cache_keys_cover_the_code_that_fits(monkeypatch):
    """Both fits are keyed by what their code computes: a change to a function that fits (not to its
    docstring) moves the key, so nothing fitted by other code is loaded."""
    from utils.safety import cascade, fitcache

    rows = [{"text": "hello", "kind": "short", "label": 0}]
    screen = safety.Screen("crisis")
    fast, stage = safety._cache_folder("crisis", rows), safety._stage_key("crisis", rows, screen)
    assert safety._cache_folder("replies", rows) != fast
    original = safety.choose_rule

    def choose_rule(blend, y, triggers=None, screen=None, max_fp=safety.MAX_FP_CV):
        """Only the docstring differs from a plain call."""
        return original(blend, y, triggers, screen, max_fp)

    monkeypatch.setattr(cascade, "choose_rule", choose_rule)  # where _stage_code reads it
    moved = safety._stage_key("crisis", rows, screen)
    assert moved["code"] != stage["code"] and {k for k in stage if moved[k] != stage[k]} == {"code"}
    assert safety._cache_folder("crisis", rows) == fast  # the fast path does not use the rule
    cv_scores = lambda texts, y, folds=4, seed=0, what="": None  # noqa: E731
    monkeypatch.setattr(fitcache, "_cv_scores", cv_scores)  # where _fast_code reads it
    monkeypatch.setattr(cascade, "_cv_scores", cv_scores)  # where _stage_code reads it
    assert safety._cache_folder("crisis", rows) != fast
    assert safety._stage_key("crisis", rows, screen)["code"] != moved["code"]  # the rule is chosen on its scores
    # the code of the judge that reads the hidden states is part of it too
    from utils import judge

    monkeypatch.setattr(judge.LLMJudge, "asked_state", lambda self, *a: None)
    assert safety._stage_key("crisis", rows, screen)["code"] != moved["code"]
    # other rows, another screen prompt: other keys
    other = [{**rows[0], "label": 1}]
    assert safety._stage_key("crisis", other, screen)["rows"] != stage["rows"]
    monkeypatch.setitem(safety.SCREENS, "crisis", ("another system prompt", "?"))
    assert safety._stage_key("crisis", rows, screen)["screen"] != stage["screen"]


def test_the_shipped_second_stages_are_fitted_on_the_current_data_and_code():
    """data/safety_fit/*.json: what a brand-new machine loads instead of reading every train text with the
    judge. Red when the safety data or the code that fits them changed since they were written: run
    `python -m utils.safety fit --ship` (about 30 min on 2 AVX2 cores) and commit the files."""
    assert safety.stale_shipped() == {}, "run `python -m utils.safety fit --ship` and commit data/safety_fit/"
    keys = safety.current_stage_keys()
    for name, key in keys.items():
        shipped = json.loads((safety.SHIPPED_FIT / f"{name}.json").read_text())
        assert shipped["key"] == key and shipped["rules"]["chosen"]["recall"] > 0
        assert (safety.SHIPPED_FIT / f"{name}.json").stat().st_size < 200_000  # small enough to ship
    # the check can fail: a planted train row, or other code, and it says which part moved
    planted = {**keys, "crisis": {**keys["crisis"], "rows": "0" * 16}}
    assert safety.stale_shipped(planted) == {"crisis": ["rows"]}
    recoded = {**keys, "replies": {**keys["replies"], "code": "f" * 16}}
    assert safety.stale_shipped(recoded) == {"replies": ["code"]}


@pytest.mark.slow
def test_a_new_machine_fits_the_fast_paths_and_loads_the_shipped_second_stages(tmp_path, monkeypatch):
    """With an empty cache the default detector and filter fit their fast paths (the same as the record's:
    the fit is deterministic) and take their second stages from data/safety_fit/ without the judge
    reading a single train text."""
    monkeypatch.setenv("LORA_COMPARE_CACHE", str(tmp_path))

    def no_judge(*args, **kwargs):
        raise AssertionError("the judge was asked to read a text while the classifiers were loaded")

    monkeypatch.setattr(safety.Screen, "features", no_judge)
    monkeypatch.setattr(safety.Screen, "probability", no_judge)
    assert not safety.fitted()
    for model, name, part in ((safety.CrisisDetector(), "crisis", "crisis_detector"),
                              (safety.OutputFilter(), "replies", "output_filter")):
        shipped = json.loads((safety.SHIPPED_FIT / f"{name}.json").read_text())
        assert model.stage["source"] == f"data/safety_fit/{name}.json"
        assert model.rules == shipped["rules"] and model.probe is not None and model.probe.params == shipped["probe"]
        assert model.cv["auc"] == EXAMPLE[part]["chosen_on_train_cv"]["auc"]
    assert safety.fitted()


def test_detector_is_fitted_once_then_loaded_from_its_cache(tmp_path, monkeypatch):
    """Threshold and patterns chosen by CV on the train rows only; a second construction with the
    same rows loads the saved fit (no fitting at all) and answers identically; other rows fit anew."""
    monkeypatch.setenv("LORA_COMPARE_CACHE", str(tmp_path))
    good, bad = TOY
    rows = ([{"text": t, "kind": "everyday", "label": 0, "split": "train"} for t in dict.fromkeys(good)]
            + [{"text": t, "kind": "explicit", "label": 1, "split": "train"} for t in dict.fromkeys(bad)]
            + [{"text": "held out: never fitted", "kind": "explicit", "label": 1, "split": "test"}])
    first = safety.CrisisDetector(rows, screen=None)
    assert first.cv["n_train"] == 12 and set(first.cv["auc"]) == {"fast path"}
    saved = list((tmp_path / "safety").iterdir())
    assert len(saved) == 1 and (saved[0] / "meta.json").exists()

    def no_fit(*args, **kwargs):
        raise AssertionError("fitted again although the cache holds this fit")

    monkeypatch.setattr(safety.TextClassifier, "fit", no_fit)
    second = safety.CrisisDetector(rows, screen=None)
    texts = ["the dinner was awful today", "a quiet evening in"]
    assert np.allclose(second.probabilities(texts), first.probabilities(texts), atol=1e-9)
    assert second.threshold == first.threshold and second.patterns == first.patterns
    damaged = saved[0] / "model" / "model.pkl"
    damaged.write_bytes(b"not a pickle")
    with pytest.raises(RuntimeError, match="(?s)cannot be read.*delete that folder and run `make safety`"):
        safety.CrisisDetector(rows, screen=None)
    assert (saved[0] / "meta.json").exists()  # nothing deleted behind the user's back
    with pytest.raises(AssertionError, match="fitted again"):
        safety.CrisisDetector(rows[:-2] + rows[-1:], screen=None)  # different train rows: a new fit


def test_prune_removes_only_the_fits_of_earlier_data(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_COMPARE_CACHE", str(tmp_path))
    current = safety.current_cache_folders()
    root = tmp_path / "safety"
    assert current["crisis"].parent == root == current["replies"].parent
    stale = [root / "crisis-0123456789abcdef", root / "replies-fedcba9876543210"]
    kept = [*current.values(), root / ".crisis-0123.tmp-42", root / "judge-cache"]
    for folder in stale + kept:
        (folder / "model").mkdir(parents=True)
    (root / "crisis-notes.txt").write_text("a file, not a fit")
    stages = {n: root / f"{n}-stage-{safety._stage_digest(k)}.json" for n, k in safety.current_stage_keys().items()}
    for path in [*stages.values(), root / "crisis-stage-0123456789abcdef.json"]:
        path.write_text("{}")
    kept += list(stages.values())
    stale = sorted([*stale, root / "crisis-stage-0123456789abcdef.json"])
    assert safety.prune(dry_run=True) == sorted(stale) and all(p.exists() for p in stale)
    assert safety.prune() == sorted(stale)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    assert (root / "crisis-notes.txt").exists() and safety.prune() == []
