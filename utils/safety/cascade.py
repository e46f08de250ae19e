"""The two cascades (the crisis detector and the output filter): the fast path and, for what it cannot
decide, the judge LLM; the key their second stage is fitted under (``_stage_key``); and the calls the
dashboard and the evaluation make (``crisis_flag``, ``output_check``, ``preload``)."""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from ..paths import shown
from ..safety_screen import Screen
from .classifiers import (TextClassifier, _asked, _auc, _cv_scores, _rates, _screen_rows, choose_rule, embed,
                          nested_recall, nested_rule, pick_threshold, rule_flags)
from .fitcache import (SHIPPED_FIT, _cache_folder, _cached, _cv_summary, _read_stage, _rows_key, _stage_digest,
                       _write_aside)
from .labelled import CRISIS_SETS, REPLY_SETS, load_labelled
from .probe import HiddenStateProbe, _screen_from_env, _screen_scores, _screen_setting
from .settings import BUDGETS, HI_GRID, LO_GRID, MAX_FP_CV, MAX_SCREENED_PIECES, PROBE, SCREEN_GRID
from .text import _EXPLICIT, _IMPLICIT, PATTERN_SETS, blocked_terms, language_doubt, pattern_flag, pieces, readable

HELP_NOTICE = (
    "If you are thinking about harming yourself or are in crisis, please reach out now: call your local "
    "emergency number, or a crisis line such as 988 (US), 116 123 (Samaritans, UK and Ireland), or find one at "
    "findahelpline.com. This demo is a research tool and cannot help in an emergency."
)
RESEARCH_NOTE = ("Research demo: outputs come from small language models, may be wrong or inappropriate, "
                 "and are not a substitute for professional advice.")


@dataclass
class Verdict:
    flag: bool                 # the message needs the help notice (crisis) / the reply is blocked (filter)
    probability: float | None  # the classifier's probability of the unsafe / crisis class (max over chunks)
    doubt: str | None = None   # why the text could not be judged
    reasons: list[str] = field(default_factory=list)
    seconds: float = 0.0
    screen: float | None = None  # the LLM screen's probability, when the fast path could not decide and asked it
    fast_seconds: float = 0.0    # of ``seconds``, the fast path's (the embedding classifiers)


def _stage_code() -> str:
    """What the second stage's fit computes: the rule's choice, the probe, the screen's input and the
    hidden state it reads, and the fast path's out-of-fold scores the rule is chosen on."""
    from .. import judge, store

    return store.objects_key(TextClassifier, embed, _cv_scores, pick_threshold, _rates, choose_rule, _asked, rule_flags,
                             nested_rule, nested_recall, _screen_rows, _screen_scores, HiddenStateProbe, Screen,
                             _Cascade._choose, _Cascade._fit_probe, _Cascade._pick_second_stage,
                             _Cascade._fit_stage, pattern_flag, judge.LLMJudge.ask, judge.LLMJudge.asked_state,
                             judge.LLMJudge._ask_feed, judge.LLMJudge._prefix, judge._clip)


def _stage_key(name: str, train: list[dict], screen) -> dict:
    """What the second stage's fit depends on, in parts (so a mismatch can say which part moved).
    Not the dtype the judge runs in: a fit made in fp32 is used in bf16 too (``fitted_with`` says which)."""
    k = list(screen.key())
    return {"cascade": name, "rows": _rows_key(train), "code": _stage_code(),
            "screen": hashlib.sha256(json.dumps([k[0], *k[2:]]).encode()).hexdigest()[:16],
            "settings": hashlib.sha256(json.dumps([HI_GRID, LO_GRID, SCREEN_GRID, MAX_FP_CV, BUDGETS, PROBE,
                                                   _EXPLICIT, _IMPLICIT]).encode()).hexdigest()[:16]}


class _Cascade:
    """The fast path (``TextClassifier``, ``rule["hi"]``) and, for what it cannot decide, the screen."""

    name: str
    rule: dict
    screen: Screen | None
    probe: HiddenStateProbe | None = None  # the second stage when it is the probe, else the question
    stage: dict | None = None  # the second stage's saved fit: its key, where it came from, how it was fitted

    @property
    def fast_model(self) -> TextClassifier:
        """The fast path's classifier (each cascade names it after what it scores)."""
        raise NotImplementedError

    def _decide(self, read: list[str], unsafe: np.ndarray, trigger_fired) -> tuple[list[str], float | None]:
        """Reasons to flag (empty: none), and the second stage's score when it was asked."""
        rule, p = self.rule, float(unsafe.max())
        if p >= rule["hi"]:
            return ["classifier"], None
        if self.screen is None or rule["screen"] is None:
            return [], None
        undecided = [i for i in np.argsort(-unsafe)
                     if (rule["lo"] is not None and unsafe[i] >= rule["lo"])
                     or (rule["trigger"] and trigger_fired(read[i], rule["trigger"]))][:MAX_SCREENED_PIECES]
        if not undecided:
            return [], None
        if self.probe is not None:
            probe = self.probe.probability([read[i] for i in undecided])
            q = float(max((unsafe[i] + x) / 2 for i, x in zip(undecided, probe)))
            return ([f"LLM probe, score {q:.2f}"] if q >= rule["screen"] else []), q
        q = max(self.screen.probability(read[i]) for i in undecided)
        return ([f"LLM screen, P(Yes) {q:.2f}"] if q >= rule["screen"] else []), q

    def _fit_probe(self, texts: list[str], y: np.ndarray, triggers: dict[str, np.ndarray], what: str):
        """The probe on the train rows and the rule chosen with its out-of-fold scores (averaged with
        the fast path's), like the question's. Its C is the one of ``PROBE["c_grid"]`` whose rule has the
        best nested recall on these rows (ties: fewer texts read, then the smaller C, the stronger
        regularisation); every C tried is kept in ``probe_c``."""
        blend = np.array(self.cv["out_of_fold"])
        features = self.screen.features(texts, desc=f"reading the {what}'s train split with the judge LLM")
        tried = {}
        for c in PROBE["c_grid"]:
            oof = HiddenStateProbe(self.screen, c).out_of_fold(features, y)
            tried[c] = (oof, nested_rule(blend, y, triggers, (blend + oof) / 2))
        c = max(tried, key=lambda c: (nested_recall(tried[c][1]), -tried[c][1]["asked"], -c))
        oof, rule = tried[c]
        recipe = {k: v for k, v in PROBE.items() if k != "c_grid"}
        return HiddenStateProbe(self.screen, c).fit(features, y), {
            "fast": nested_rule(blend, y), "chosen": rule,
            "screen_model": self.screen.key()[:2], "second_stage": "probe", "probe": {**recipe, "c": c},
            "probe_c": {str(k): {"nested_recall": nested_recall(r), "budget": r["budget"], "read": r["asked"]}
                        for k, (_, r) in tried.items()},
            "probe_auc": {"probe": _auc(oof, y), "mean with the fast path": _auc((blend + oof) / 2, y)},
            "probe_on_train": [round(float(x), 4) for x in oof]}

    def _pick_second_stage(self, rules: dict, texts: list[str], y: np.ndarray,
                           triggers: dict[str, np.ndarray], what: str) -> tuple[dict, HiddenStateProbe | None]:
        """Question or probe: the one whose rule has the better nested recall (``nested_rule``: on rows it
        was not chosen on) within the false-positive budget (ties: the one that asks fewer texts)."""
        if not hasattr(self.screen, "features"):
            return rules, None
        probe, probed = self._fit_probe(texts, y, triggers, what)
        rank = lambda r: (nested_recall(r), -r["asked"])  # noqa: E731
        if probed["chosen"]["screen"] is not None and rank(probed["chosen"]) > rank(rules["chosen"]):
            return {**probed, "question": rules["chosen"]}, probe
        return {**rules, "probe": probed["chosen"], "probe_auc": probed["probe_auc"]}, None

    def _choose(self, texts: list[str], y: np.ndarray, meta: dict, triggers: dict[str, np.ndarray], what: str):
        blend = np.array(meta["out_of_fold"])
        fast = nested_rule(blend, y)
        if self.screen is None:
            return {"fast": fast, "chosen": fast}
        screen = _screen_scores(texts, _screen_rows(blend, triggers), self.screen, what)
        return {"fast": fast, "chosen": nested_rule(blend, y, triggers, screen), "screen_model": self.screen.key()[:2],
                "screen_on_train": [None if np.isnan(x) else round(float(x), 4) for x in screen]}

    def _fit_stage(self, texts: list[str], y: np.ndarray, triggers: dict[str, np.ndarray], what: str) -> dict:
        """The second stage fitted on this machine: the question's rule, then the probe if it does better."""
        rules = self._choose(texts, y, self.cv, triggers, what)
        rules, probe = self._pick_second_stage(rules, texts, y, triggers, what)
        return {"rules": rules, "probe": probe.params if probe is not None else None}

    def _second_stage(self, name: str, train: list[dict], texts: list[str], y: np.ndarray,
                      triggers: dict[str, np.ndarray], what: str, cache: bool) -> None:
        """``self.rules`` and ``self.probe``: without a screen the fast path's own rule; else the shipped
        fit when its key is the current one (``SHIPPED_FIT``), else one kept on this machine, else fitted
        here (the judge reads every train text: named, with progress) and kept."""
        if self.screen is None:
            self.rules, self.probe = self._choose(texts, y, self.cv, triggers, what), None
            return
        from ..hardware import cpu_model
        from ..models import cache_dir

        key = _stage_key(name, train, self.screen)
        saved = None
        shipped = SHIPPED_FIT / f"{name}.json"
        if cache and shipped.is_file() and (found := _read_stage(shipped))["key"] == key:
            saved = {**found, "source": shown(shipped)}
        local = cache_dir() / "safety" / f"{name}-stage-{_stage_digest(key)}.json"
        if saved is None and cache and local.is_file():
            saved = {**_read_stage(local), "source": shown(local)}
        if saved is None:
            if cache and name in ("crisis", "replies") and shipped.is_file():
                moved = [part for part in key if found["key"].get(part) != key[part]]
                print(f"{shown(shipped)} was fitted on other {', '.join(moved)}: fitting the {what}'s second stage "
                      f"here (the judge reads its {len(texts)} train texts, about 1-2 s each on 2 cores); "
                      "`python -m utils.safety fit --ship` writes the shipped file again", file=sys.stderr)
            start = time.perf_counter()
            saved = {"key": key, **self._fit_stage(texts, y, triggers, what),
                     "fitted_with": {"dtype": self.screen.key()[1], "cpu": cpu_model(),
                                     "seconds": round(time.perf_counter() - start, 1)}}
            if cache:
                _write_aside(local, lambda tmp: tmp.write_text(json.dumps(saved, indent=1), encoding="utf-8"))
                saved = {**saved, "source": shown(local)}
        self.stage, self.rules = saved, saved["rules"]
        self.probe = HiddenStateProbe.from_params(self.screen, saved["probe"]) if saved["probe"] else None


class CrisisDetector(_Cascade):
    """``TextClassifier`` (logistic regression on frozen MiniLM embeddings and character n-grams) and,
    for the messages it cannot decide, the judge LLM (its Yes/No question or the probe on its hidden
    states, whichever cross-validation prefers); thresholds and the use of the regular expressions
    chosen by cross-validation on the train split. The fast path is fitted once per machine (about a
    minute) and cached; the second stage ships with the repository (``SHIPPED_FIT``)."""

    name = "crisis"

    def __init__(self, rows: list[dict] | None = None, cache: bool = True, screen: Screen | None | str = "default"):
        rows = rows if rows is not None else load_labelled(CRISIS_SETS, "positive")
        train = [r for r in rows if r["split"] == "train"]
        texts = [r["text"] for r in train]
        y = np.array([r["label"] for r in train])
        self.screen = _screen_from_env("crisis") if screen == "default" else screen

        def fit():
            meta = {**_cv_summary(_cv_scores(texts, y, what="crisis detector"), y), "n_train": len(train)}
            return meta, {"model": TextClassifier().fit(texts, y)}

        self.cv, fitted = _cached(_cache_folder("crisis", train) if cache else None, fit, {"model": TextClassifier})
        self.model = fitted["model"]
        triggers = {name: np.array([pattern_flag(t, name) for t in texts]) for name in PATTERN_SETS}
        self._second_stage("crisis", train, texts, y, triggers, "crisis detector", cache)
        self.rule = self.rules["chosen"]
        self.threshold, self.patterns = self.rule["hi"], self.rule["trigger"]

    @property
    def fast_model(self) -> TextClassifier:
        return self.model

    def probabilities(self, texts: list[str]) -> np.ndarray:
        return self.model.predict_proba(texts)[:, 1]

    def check(self, text) -> Verdict:
        start = time.perf_counter()
        text, doubt = readable(text)
        doubt = doubt or (language_doubt(text) if text.strip() else None)
        if doubt or not text.strip():
            return Verdict(False, None, doubt, [], time.perf_counter() - start)
        read = pieces(text)
        p = self.probabilities(read)
        fast = time.perf_counter() - start
        reasons, q = self._decide(read, p, pattern_flag)
        return Verdict(bool(reasons), float(p.max()), None, reasons, time.perf_counter() - start, q, fast)


class OutputFilter(_Cascade):
    """Unsafe or not (``TextClassifier`` and, for what it cannot decide, the question or the probe on
    the judge LLM; rule and second stage chosen like the detector's), and which unsafe kind of
    ``unsafe_replies.yaml`` to name as the reason (logistic regression over the kinds); plus the word
    list. The fast path is fitted once per machine and cached; the second stage ships."""

    name = "replies"

    def __init__(self, rows: list[dict] | None = None, cache: bool = True, screen: Screen | None | str = "default"):
        rows = rows if rows is not None else load_labelled(REPLY_SETS, "unsafe")
        train = [r for r in rows if r["split"] == "train"]
        texts = [r["text"] for r in train]
        kinds = np.array([r["kind"] if r["label"] else "safe" for r in train])
        y = np.array([r["label"] for r in train])
        self.screen = _screen_from_env("replies") if screen == "default" else screen

        def fit():
            meta = {**_cv_summary(_cv_scores(texts, y, what="output filter"), y), "n_train": len(train)}
            return meta, {"unsafe": TextClassifier().fit(texts, y), "kinds": TextClassifier().fit(texts, kinds)}

        folder = _cache_folder("replies", train) if cache else None
        self.cv, fitted = _cached(folder, fit, {"unsafe": TextClassifier, "kinds": TextClassifier})
        self.unsafe_model, self.kind_model = fitted["unsafe"], fitted["kinds"]
        self._second_stage("replies", train, texts, y, {}, "output filter", cache)
        self.rule = self.rules["chosen"]
        self.threshold = self.rule["hi"]

    @property
    def fast_model(self) -> TextClassifier:
        return self.unsafe_model

    def check(self, text, config: str | None = None) -> Verdict:
        start = time.perf_counter()
        text, doubt = readable(text)
        terms = blocked_terms(text, config)
        reasons = [f"word list: {', '.join(terms)}"] if terms else []
        p = q = None
        fast = 0.0
        if text.strip() and doubt is None:
            read = pieces(text)
            unsafe = self.unsafe_model.predict_proba(read)[:, 1]
            p = float(unsafe.max())
            fast = time.perf_counter() - start
            flagged, q = self._decide(read, unsafe, None)
            if flagged:
                kinds = self.kind_model.predict_proba([read[int(unsafe.argmax())]])[0]
                ranked = [k for k in self.kind_model.classes_[np.argsort(-kinds)] if k != "safe"]
                reasons.insert(0, ranked[0].replace("_", " ") + (f" ({flagged[0]})" if q is not None else ""))
                # e.g. "harassment", or "harmful instructions (LLM screen, P(Yes) 0.91)"
        seconds = time.perf_counter() - start
        return Verdict(bool(reasons), p, doubt, reasons, seconds, q, fast or seconds)


@lru_cache(maxsize=2)
def _detector(setting: str) -> CrisisDetector:
    return CrisisDetector()


@lru_cache(maxsize=2)
def _output_filter(setting: str) -> OutputFilter:
    return OutputFilter()


def detector() -> CrisisDetector:
    """The crisis detector, with the screen ``LORA_COMPARE_SAFETY_SCREEN`` names (one per setting)."""
    return _detector(_screen_setting())


def output_filter() -> OutputFilter:
    return _output_filter(_screen_setting())


def preload() -> None:
    """Fit or load both classifiers, and load the screen's judge LLM (when there is one), so that a
    later message never waits for it (the dashboard calls this behind a spinner)."""
    for model in (detector(), output_filter()):
        if model.screen is not None and model.rule["screen"] is not None:
            from .. import judge

            judge.shared(model.screen.model, model.screen.dtype)


def crisis_check(text) -> Verdict:
    return detector().check(text)


def crisis_flag(text) -> bool:
    """Show the help notice: the detector flags the text, or cannot judge it (when in doubt, show it)."""
    verdict = crisis_check(text)
    return verdict.flag or verdict.doubt is not None


def output_check(text, config: str | None = None) -> Verdict:
    return output_filter().check(text, config)
