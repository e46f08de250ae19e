"""The fast path both cascades share (``TextClassifier``: logistic regression on frozen sentence
embeddings and character n-grams, its out-of-fold scores ``_cv_scores``) and the decision rule chosen on
those scores: the threshold within a false-positive budget (``pick_threshold``), the cascade's rule
(``choose_rule``, applied by ``rule_flags``) and the budget chosen in a nested split (``nested_rule``)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from .settings import BUDGETS, HI_GRID, LO_GRID, MAX_FP_CV, NESTED_FOLDS, SCREEN_GRID

@lru_cache(maxsize=1)
def embedder():
    from ..metrics import Embedder

    return Embedder()


_EMBEDDED: dict[str, np.ndarray] = {}


def embed(texts: list[str]) -> np.ndarray:
    """Sentence embeddings, each text encoded once per process (cross-validation refits reuse them)."""
    todo = [t for t in dict.fromkeys(texts) if t not in _EMBEDDED]
    if todo:
        if len(_EMBEDDED) > 50_000:
            _EMBEDDED.clear()
        _EMBEDDED.update(zip(todo, embedder().encode(todo)))
    return np.stack([_EMBEDDED[t] for t in texts])


class TextClassifier:
    """Logistic regression on two views of a text: its all-MiniLM-L6-v2 sentence embedding (what it
    is about) and TF-IDF of its character 2-5-grams within words (how it is said: "kill myself" vs
    "killing me", typos). Fits in seconds: the fast path of both cascades (fine-tuning the encoder
    instead cost about 100 minutes cold on 2 AVX2 cores for both cascades; docs/safety.md)."""

    def __init__(self, c: float = 4.0):
        self.c = c

    def _features(self, texts: list[str], fit: bool = False):
        from scipy.sparse import csr_matrix, hstack
        from sklearn.feature_extraction.text import TfidfVectorizer

        if fit:
            self.ngrams = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True).fit(texts)
        return hstack([csr_matrix(embed(texts)), self.ngrams.transform(texts)]).tocsr()

    def fit(self, texts: list[str], labels) -> "TextClassifier":
        from sklearn.linear_model import LogisticRegression

        self.model = LogisticRegression(C=self.c, class_weight="balanced", max_iter=3000)
        self.model.fit(self._features(texts, fit=True), np.asarray(labels))
        self.classes_ = self.model.classes_
        return self

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        return self.model.predict_proba(self._features(texts))

    def save(self, folder: Path) -> None:
        import pickle

        folder.mkdir(parents=True, exist_ok=True)  # the fitted scikit-learn objects only, not this class
        (folder / "model.pkl").write_bytes(pickle.dumps({"c": self.c, "ngrams": self.ngrams, "model": self.model}))

    @classmethod
    def load(cls, folder: Path) -> "TextClassifier":
        import pickle

        saved = pickle.loads((folder / "model.pkl").read_bytes())  # our own cache, written by ``save``
        model = cls(saved["c"])
        model.ngrams, model.model = saved["ngrams"], saved["model"]
        model.classes_ = model.model.classes_
        return model


def _cv_scores(texts: list[str], y: np.ndarray, folds: int = 5, seed: int = 0, what: str = "") -> np.ndarray:
    """Out-of-fold probability of the positive class (binary) of ``TextClassifier`` for every training row."""
    from sklearn.model_selection import StratifiedKFold
    from tqdm.auto import tqdm

    out = np.zeros(len(y))
    splits = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))
    embed(texts)  # each text embedded once, before the folds, with its own progress
    for train, held in tqdm(splits, desc=f"cross-validating the {what} on its train split".replace("  ", " "),
                            unit="fold"):
        model = TextClassifier().fit([texts[i] for i in train], y[train])
        out[held] = model.predict_proba([texts[i] for i in held])[:, 1]
    return out


def pick_threshold(scores: np.ndarray, labels: np.ndarray, max_fp: float = MAX_FP_CV,
                   always: np.ndarray | None = None) -> float:
    """The lowest threshold whose false-positive rate on these (cross-validated) scores is <= ``max_fp``.
    ``always``: rows flagged whatever their score (another layer OR-ed in); their false positives
    use up the budget first, and when they alone pass it the answer is ``inf`` (nothing fits)."""
    always = np.zeros(len(labels), bool) if always is None else np.asarray(always, bool)
    neg = labels == 0
    allowed = int(np.floor(max_fp * neg.sum())) - int((always & neg).sum())  # negatives that may pass it
    if allowed < 0:
        return float("inf")
    negatives = np.sort(scores[neg & ~always])[::-1]
    if allowed >= len(negatives):
        return 0.0
    return float(np.nextafter(negatives[allowed], 1.0))


def _rates(flags: np.ndarray, labels: np.ndarray) -> dict:
    pos, neg = labels == 1, labels == 0
    return {"recall": float(flags[pos].mean()) if pos.any() else None,
            "false_positive_rate": float(flags[neg].mean()) if neg.any() else None}


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return round(float(roc_auc_score(labels, scores)), 3)


def choose_rule(blend: np.ndarray, y: np.ndarray, triggers: dict[str, np.ndarray] | None = None,
                screen: np.ndarray | None = None, max_fp: float = MAX_FP_CV) -> dict:
    """The decision rule with the best recall whose false-positive rate on these cross-validated
    scores stays within ``max_fp`` (ties: the one that asks the screen least). Without ``screen``
    scores: the fast path alone (flag when ``blend >= hi``, the lowest such threshold). With them,
    the cascade: flag when ``blend >= hi``, or when the row is undecided (``lo <= blend < hi``, or
    a ``trigger`` layer such as the regular expressions fires below ``hi``) and the screen's
    probability is ``>= screen``; ``screen`` holds it for every row any rule could ask (NaN elsewhere)."""
    hi = pick_threshold(blend, y, max_fp)
    best = {"hi": float(hi), "lo": None, "trigger": None, "screen": None, "asked": 0.0, **_rates(blend >= hi, y)}
    if screen is None:
        return best
    triggers = triggers or {}
    for hi in HI_GRID:
        for lo in (None, *[x for x in LO_GRID if x < hi]):
            for trigger in (None, *triggers):
                option = {"hi": float(hi), "lo": lo, "trigger": trigger}
                asked = _asked(option, blend, triggers)
                if not asked.any():
                    continue
                for cut in SCREEN_GRID:
                    rates = _rates(rule_flags({**option, "screen": float(cut)}, blend, triggers, screen), y)
                    if rates["false_positive_rate"] > max_fp:
                        continue
                    candidate = {**option, "screen": float(cut), "asked": round(float(asked.mean()), 3), **rates}
                    if (candidate["recall"], -candidate["asked"]) > (best["recall"], -best["asked"]):
                        best = candidate
    return best


def _asked(rule: dict, blend: np.ndarray, triggers: dict[str, np.ndarray]) -> np.ndarray:
    """The rows ``rule`` sends to the second stage: below ``hi``, and in its band or fired on by its trigger."""
    band = blend >= rule["lo"] if rule["lo"] is not None else np.zeros(len(blend), bool)
    fired = triggers[rule["trigger"]] if rule["trigger"] else np.zeros(len(blend), bool)
    return (blend < rule["hi"]) & (band | fired)


def rule_flags(rule: dict, blend: np.ndarray, triggers: dict[str, np.ndarray] | None = None,
               screen: np.ndarray | None = None) -> np.ndarray:
    """Which rows ``rule`` (from ``choose_rule``) flags, given the same kinds of scores it was chosen on."""
    flags = blend >= rule["hi"]
    if rule["screen"] is None:
        return flags
    return flags | (_asked(rule, blend, triggers or {}) & (np.nan_to_num(screen, nan=0.0) >= rule["screen"]))


def nested_rule(blend: np.ndarray, y: np.ndarray, triggers: dict[str, np.ndarray] | None = None,
                screen: np.ndarray | None = None) -> dict:
    """``choose_rule`` with the false-positive budget chosen so that the *choice* is honest too.
    The best of a large grid, chosen and scored on the same cross-validated rows, looks better than
    it is (crisis, session 12: 4.5% false positives in CV, 9.9% on the held-out split). So each
    budget of ``BUDGETS`` is tried in a nested split: the rule is chosen on four fifths of the rows
    and applied to the fifth it did not see. The largest budget whose nested false-positive rate
    stays within ``MAX_FP_CV`` is used on all the rows; the nested recall and false-positive rate of
    every budget tried are kept in ``nested``, so the cost of the stricter budget is on record."""
    from sklearn.model_selection import StratifiedKFold

    triggers = triggers or {}

    def rows(idx: np.ndarray) -> tuple:  # the scores of these rows only
        return blend[idx], {k: v[idx] for k, v in triggers.items()}, None if screen is None else screen[idx]

    nested = {}
    for budget in BUDGETS:
        flags = np.zeros(len(y), bool)
        for train, held in StratifiedKFold(NESTED_FOLDS, shuffle=True, random_state=0).split(blend, y):
            b, t, s = rows(train)
            flags[held] = rule_flags(choose_rule(b, y[train], t, s, budget), *rows(held))
        nested[str(budget)] = {k: round(v, 4) for k, v in _rates(flags, y).items()}
        if nested[str(budget)]["false_positive_rate"] <= MAX_FP_CV:
            break
    return {**choose_rule(blend, y, triggers, screen, budget), "budget": budget, "nested": nested}


def nested_recall(rule: dict) -> float:
    """A ``nested_rule``'s recall on rows it was not chosen on, at the budget it uses."""
    return rule["nested"][str(rule["budget"])]["recall"]


def _screen_rows(blend: np.ndarray, triggers: dict[str, np.ndarray]) -> np.ndarray:
    """The rows some rule of ``choose_rule`` could ask the screen about."""
    fired = np.any(list(triggers.values()), axis=0) if triggers else np.zeros(len(blend), bool)
    return (blend < max(HI_GRID)) & ((blend >= min(LO_GRID)) | fired)
