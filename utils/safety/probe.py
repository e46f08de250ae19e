"""The second stage's parts on the safety side: the probe on the judge LLM's hidden states
(``HiddenStateProbe``, kept as numbers), the screen asked about the train rows a rule could send it
(``_screen_scores``), and which screen the environment names (``LORA_COMPARE_SAFETY_SCREEN``)."""
from __future__ import annotations

import base64

import numpy as np

from ..safety_screen import PROBE, Screen

def _screen_from_env(name: str) -> Screen | None:
    """The judge model ``LORA_COMPARE_SAFETY_SCREEN`` names (default: the project's judge), or no
    screen when it is ``none`` (the fast path alone)."""
    model = _screen_setting()
    return None if model.lower() == "none" else Screen(name, model)


class HiddenStateProbe:
    """Is a text positive (a crisis message; an unsafe reply), read from the judge LLM's hidden states
    (``Screen.features``): standardised, then a class-weighted logistic regression. Its score in the
    cascade is the mean of its probability and the fast path's, for the texts the fast path cannot
    decide. The recipe is ``PROBE``; its ``c`` is chosen by each cascade on its own train split."""

    def __init__(self, screen: Screen, c: float):
        self.screen, self.c = screen, c

    def _model(self):
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        return make_pipeline(StandardScaler(), LogisticRegression(C=self.c, class_weight="balanced", max_iter=3000))

    def fit(self, features: np.ndarray, labels) -> "HiddenStateProbe":
        model = self._model().fit(features, np.asarray(labels))
        scaler, regression = model[0], model[-1]
        if list(regression.classes_) != [0, 1]:
            raise ValueError(f"the probe needs labels 0 and 1; got {regression.classes_.tolist()}")
        self.params = {"c": self.c, **{name: _pack(v) for name, v in (
            ("mean", scaler.mean_), ("scale", scaler.scale_), ("coef", regression.coef_[0]),
            ("intercept", regression.intercept_))}}
        return self

    @classmethod
    def from_params(cls, screen: Screen, params: dict) -> "HiddenStateProbe":
        """The probe as ``params`` (what ``fit`` keeps) describes it: no fitting, no sklearn objects."""
        probe = cls(screen, params["c"])
        probe.params = params
        return probe

    def scores(self, features: np.ndarray) -> np.ndarray:
        """The probe's probability for rows of features: the standardised features' logistic regression,
        computed from ``params`` (float32, as kept), so a fresh fit and a shipped one answer alike."""
        p = {k: _unpack(self.params[k]) for k in ("mean", "scale", "coef", "intercept")}
        z = ((np.asarray(features, np.float64) - p["mean"]) / p["scale"]) @ p["coef"] + p["intercept"][0]
        return 1.0 / (1.0 + np.exp(-z))

    def out_of_fold(self, features: np.ndarray, labels) -> np.ndarray:
        """Cross-validated probabilities for the train rows (what the rule is chosen on)."""
        from sklearn.model_selection import StratifiedKFold

        y = np.asarray(labels)
        out = np.zeros(len(y))
        for train, held in StratifiedKFold(PROBE["folds"], shuffle=True, random_state=0).split(features, y):
            out[held] = self._model().fit(features[train], y[train]).predict_proba(features[held])[:, 1]
        return out

    def probability(self, texts: list[str]) -> np.ndarray:
        return self.scores(self.screen.features(texts))


def _pack(values) -> str:
    """Numbers as base64 of little-endian float32 (compact, exact for what the probe keeps)."""
    return base64.b64encode(np.asarray(values, "<f4").tobytes()).decode()


def _unpack(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), "<f4").astype(np.float64)


def _screen_scores(texts: list[str], rows: np.ndarray, screen: Screen, what: str) -> np.ndarray:
    from tqdm.auto import tqdm

    out = np.full(len(texts), np.nan)
    for i in tqdm(np.flatnonzero(rows), desc=f"asking the LLM screen about the {what}'s undecided train rows",
                  unit="text"):
        out[i] = screen.probability(texts[i])
    return out


def _screen_setting() -> str:
    import os

    return os.environ.get("LORA_COMPARE_SAFETY_SCREEN", "qwen2.5-coder-1.5b")
