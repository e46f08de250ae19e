"""Safety for the dashboard and the evaluation outputs, measured on labelled data we wrote.

- **Crisis detector** (``crisis_check``, ``crisis_flag``): does a message say that the writer, or
  someone they describe, may be at risk of suicide or self-harm? A logistic regression on the
  all-MiniLM-L6-v2 sentence embeddings the project already ships and character n-grams, trained on the train split of
  ``data/eval/safety/crisis_messages.yaml`` (440 messages, ten kinds: explicit, implicit, indirect,
  third-person; and hyperbole, alarming words in benign use, negated, quoted, sad but not in crisis,
  everyday). Its threshold is the lowest whose false-positive rate in 5-fold cross-validation *on
  the train split* stays at or below 5%; the regular expressions written earlier are OR-ed in only
  if they add recall in that same cross-validation. The held-out test split is fixed by a hash of
  each text (``split_of``) and is used only by ``evaluate``.
- **Output filter** (``output_check``): a reply is blocked, with the reason, when the same kind of
  classifier (trained on ``data/eval/safety/unsafe_replies.yaml``: harmful instructions,
  encouragement of self-harm, harassment; and safe replies, including safe talk about dangerous
  topics) puts it in an unsafe kind, or when the configurable word list (``configs/safety.yaml``,
  ``blocked_terms``) matches: an extra, explicit layer.
- Text the detector cannot judge (not English, binary) returns ``doubt``; the dashboard then shows
  the help notice rather than nothing.

    python -m utils.safety evaluate [--out FILE]   # recall per kind, false positives, 95% intervals
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import yaml

from .paths import CONFIGS_DIR, DATA_DIR

SAFETY_DATA = DATA_DIR / "eval" / "safety"
CRISIS_DATA = SAFETY_DATA / "crisis_messages.yaml"
REPLY_DATA = SAFETY_DATA / "unsafe_replies.yaml"
MAX_FP_CV = 0.05  # the false-positive rate a threshold may reach in cross-validation on the train split (the target)
CHUNK_CHARS = 800  # long texts are read in pieces of about this size (the embedder reads 256 tokens)

HELP_NOTICE = (
    "If you are thinking about harming yourself or are in crisis, please reach out now: call your local "
    "emergency number, or a crisis line such as 988 (US), 116 123 (Samaritans, UK and Ireland), or find one at "
    "findahelpline.com. This demo is a research tool and cannot help in an emergency."
)
RESEARCH_NOTE = ("Research demo: outputs come from small language models, may be wrong or inappropriate, "
                 "and are not a substitute for professional advice.")

_EXPLICIT = [
    r"\b(kill(ing)?|hurt(ing)?|harm(ing)?|cut(ting)?)\s+my\s*self\b",
    r"\bsuicid(e|al)\b",
    r"\bend(ing)?\s+(my|it\s+all|my\s+own)\s*(life)?\b",
    r"\btake\s+my\s+(own\s+)?life\b",
    r"\bwant(ed)?\s+to\s+die\b",
    r"\bself[-\s]?harm",
    r"\boverdose\b",
    r"\bdon'?t\s+want\s+to\s+(live|be\s+alive|wake\s+up)\b",
]
_IMPLICIT = [
    r"\bno\s+(reason|point)\s+(to|in)\s+(go(ing)?\s+on|liv(e|ing))\b",
    r"\bbetter\s+off\s+without\s+me\b",
    r"\bcan'?t\s+go\s+on\b",
    r"\b(wish|want)\s+i\s+(was|were)\s+(dead|never\s+born)\b",
    r"\bnot\s+be\s+here\s+anymore\b",
    r"\bgoodbye\s+forever\b",
    r"\bgive\s+up\s+on\s+(life|everything)\b",
]
_HYPERBOLE = [
    r"\bkill\s+my\s*self\s+(laughing|with\s+laughter)\b",
    r"\b(killing|kills)\s+me\b",
    r"\bdying\s+(to|of\s+laughter)\b",
    r"\bdie\s+of\s+(embarrassment|laughter|boredom)\b",
    r"\bkill\s+(the|a|this)\s+(process|task|job|lights|engine)\b",
    r"\bsuicide\s+(squad|doors?|mission)\b",
]
_EXPLICIT_RE = [re.compile(p, re.IGNORECASE) for p in _EXPLICIT]
_IMPLICIT_RE = [re.compile(p, re.IGNORECASE) for p in _IMPLICIT]
_HYPERBOLE_RE = [re.compile(p, re.IGNORECASE) for p in _HYPERBOLE]


def pattern_flag(text: str) -> bool:
    """The regular expressions: True when ``text`` matches an explicit or implicit phrasing
    (hyperbole removed first). Kept as a measured extra layer of the learned detector."""
    cleaned = text
    for pattern in _HYPERBOLE_RE:
        cleaned = pattern.sub(" ", cleaned)
    return any(p.search(cleaned) for p in _EXPLICIT_RE + _IMPLICIT_RE)


@lru_cache(maxsize=4)
def _block_patterns(path: str) -> list[re.Pattern]:
    config = yaml.safe_load(open(path, encoding="utf-8")) or {}
    words = [re.escape(w) for w in config.get("words", [])]
    pats = list(config.get("patterns", []))
    return [re.compile(rf"\b{w}\b", re.IGNORECASE) for w in words] + [re.compile(p, re.IGNORECASE) for p in pats]


def blocked_terms(text: str, config: str | None = None) -> list[str]:
    """The configured unsafe words/patterns found in ``text`` (empty list: nothing to block)."""
    path = config or str(CONFIGS_DIR / "safety.yaml")
    return sorted({m.group(0).lower() for p in _block_patterns(path) for m in p.finditer(text)})


# --------------------------------------------------------------------------- labelled data


def split_of(text: str) -> str:
    """The fixed split of a labelled text: ``test`` for a quarter of them (by a hash of the text,
    so it depends on nothing else), ``train`` for the rest."""
    return "test" if hashlib.sha1(text.encode("utf-8")).digest()[0] % 4 == 0 else "train"


def load_labelled(path: Path, positive: str) -> list[dict]:
    """Rows {text, kind, label, split} of a labelled YAML file: two top-level groups (the
    ``positive`` one gets label 1), each a mapping of kind -> list of texts."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or positive not in data or len(data) != 2:
        raise ValueError(f"{path}: expected two top-level groups, one named {positive!r}")
    rows = []
    for group, kinds in data.items():
        for kind, texts in kinds.items():
            for text in texts:
                rows.append({"text": text, "kind": kind, "label": int(group == positive), "split": split_of(text)})
    return rows


# --------------------------------------------------------------------------- text the models can read


def readable(text) -> tuple[str, str | None]:
    """``text`` as clean str, and why it cannot be judged (None: it can). Bytes are decoded as
    UTF-8 with replacement; control characters go."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    text = "".join(ch for ch in str(text) if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
    letters = [ch for ch in text if ch.isalpha()]
    if not letters:
        junk = sum(ch == "\ufffd" for ch in text)
        return text, ("not text (undecodable bytes)" if junk > 3 else None)
    latin = sum(ch.isascii() for ch in letters) / len(letters)
    if latin < 0.7:
        return text, "not English (the detector reads English only)"
    return text, None


def pieces(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """What a classifier reads of ``text``: the text itself when short; otherwise its chunks and,
    so that one sentence in a long message is not drowned by the rest, each sentence too.
    Repeated pieces are read once."""
    text = " ".join(text.split())
    if len(text) <= size:
        return [text]
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
    return list(dict.fromkeys(chunks(text, size) + [s[:size] for s in sentences]))


def chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """Pieces of at most about ``size`` characters, cut at whitespace, so a long message is read whole."""
    text = " ".join(text.split())
    if len(text) <= size:
        return [text]
    out, start = [], 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            cut = text.rfind(" ", start + size // 2, end)
            end = cut if cut > start else end
        out.append(text[start:end])
        start = end + 1 if end < len(text) and text[end] == " " else end
    return out


# --------------------------------------------------------------------------- the classifiers


@lru_cache(maxsize=1)
def embedder():
    from .metrics import Embedder

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
    "killing me", typos). Chosen by 5-fold cross-validation on the crisis train split: AUC 0.91 for
    both views, 0.90 embeddings alone, 0.85 n-grams alone, 0.81 the 1.5B judge asked Yes/No."""

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


def _cv_scores(texts: list[str], y: np.ndarray, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Out-of-fold probability of the positive class (binary) for every training row."""
    from sklearn.model_selection import StratifiedKFold

    out = np.zeros(len(y))
    for train, held in StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y):
        model = TextClassifier().fit([texts[i] for i in train], y[train])
        out[held] = model.predict_proba([texts[i] for i in held])[:, 1]
    return out


def pick_threshold(scores: np.ndarray, labels: np.ndarray, max_fp: float = MAX_FP_CV) -> float:
    """The lowest threshold whose false-positive rate on these (cross-validated) scores is <= ``max_fp``."""
    negatives = np.sort(scores[labels == 0])[::-1]
    allowed = int(np.floor(max_fp * len(negatives)))  # negatives that may score at or above it
    if allowed >= len(negatives):
        return 0.0
    return float(np.nextafter(negatives[allowed], 1.0))


def _rates(flags: np.ndarray, labels: np.ndarray) -> dict:
    pos, neg = labels == 1, labels == 0
    return {"recall": float(flags[pos].mean()) if pos.any() else None,
            "false_positive_rate": float(flags[neg].mean()) if neg.any() else None}


@dataclass
class Verdict:
    flag: bool                 # the message needs the help notice (crisis) / the reply is blocked (filter)
    probability: float | None  # the classifier's probability of the unsafe / crisis class (max over chunks)
    doubt: str | None = None   # why the text could not be judged
    reasons: list[str] = field(default_factory=list)
    seconds: float = 0.0


class CrisisDetector:
    """Embeddings + logistic regression, threshold and pattern use chosen on the train split."""

    def __init__(self, rows: list[dict] | None = None):
        rows = rows if rows is not None else load_labelled(CRISIS_DATA, "positive")
        train = [r for r in rows if r["split"] == "train"]
        texts = [r["text"] for r in train]
        y = np.array([r["label"] for r in train])
        scores = _cv_scores(texts, y)
        self.threshold = pick_threshold(scores, y)
        model_only = scores >= self.threshold
        with_patterns = model_only | np.array([pattern_flag(r["text"]) for r in train])
        cv = {"model": _rates(model_only, y), "model_or_patterns": _rates(with_patterns, y)}
        # the patterns stay only if they add recall without taking false positives past the limit
        self.use_patterns = (cv["model_or_patterns"]["recall"] > cv["model"]["recall"]
                             and cv["model_or_patterns"]["false_positive_rate"] <= MAX_FP_CV)
        self.cv = {**cv, "threshold": self.threshold, "use_patterns": self.use_patterns, "n_train": len(train)}
        self.model = TextClassifier().fit(texts, y)

    def probabilities(self, texts: list[str]) -> np.ndarray:
        return self.model.predict_proba(texts)[:, 1]

    def check(self, text) -> Verdict:
        start = time.perf_counter()
        text, doubt = readable(text)
        if doubt or not text.strip():
            return Verdict(False, None, doubt, [], time.perf_counter() - start)
        p = float(self.probabilities(pieces(text)).max())
        reasons = ["classifier"] if p >= self.threshold else []
        if self.use_patterns and pattern_flag(text):
            reasons.append("patterns")
        return Verdict(bool(reasons), p, None, reasons, time.perf_counter() - start)


class OutputFilter:
    """Unsafe kinds of reply (multi-class over the kinds of ``unsafe_replies.yaml``), blocked when
    the unsafe kinds together pass a threshold chosen like the detector's; plus the word list."""

    def __init__(self, rows: list[dict] | None = None):
        rows = rows if rows is not None else load_labelled(REPLY_DATA, "unsafe")
        train = [r for r in rows if r["split"] == "train"]
        texts = [r["text"] for r in train]
        kinds = np.array([r["kind"] if r["label"] else "safe" for r in train])
        y = np.array([r["label"] for r in train])
        self.threshold = pick_threshold(_cv_scores(texts, y), y)
        self.kind_model = TextClassifier().fit(texts, kinds)
        self.unsafe_model = TextClassifier().fit(texts, y)
        self.cv = {"threshold": self.threshold, "n_train": len(train)}

    def check(self, text, config: str | None = None) -> Verdict:
        start = time.perf_counter()
        text, doubt = readable(text)
        terms = blocked_terms(text, config)
        reasons = [f"word list: {', '.join(terms)}"] if terms else []
        p = None
        if text.strip() and doubt is None:
            read = pieces(text)
            unsafe = self.unsafe_model.predict_proba(read)[:, 1]
            p = float(unsafe.max())
            if p >= self.threshold:
                kinds = self.kind_model.predict_proba([read[int(unsafe.argmax())]])[0]
                ranked = [k for k in self.kind_model.classes_[np.argsort(-kinds)] if k != "safe"]
                reasons.insert(0, ranked[0].replace("_", " "))
        return Verdict(bool(reasons), p, doubt, reasons, time.perf_counter() - start)


@lru_cache(maxsize=1)
def detector() -> CrisisDetector:
    return CrisisDetector()


@lru_cache(maxsize=1)
def output_filter() -> OutputFilter:
    return OutputFilter()


def crisis_check(text) -> Verdict:
    return detector().check(text)


def crisis_flag(text) -> bool:
    """Show the help notice: the detector flags the text, or cannot judge it (when in doubt, show it)."""
    verdict = crisis_check(text)
    return verdict.flag or verdict.doubt is not None


def output_check(text, config: str | None = None) -> Verdict:
    return output_filter().check(text, config)


# --------------------------------------------------------------------------- measured on held-out data


def _kind_table(flags: list[bool], rows: list[dict]) -> dict:
    from .ratings import wilson_interval

    label_of = {r["kind"]: r["label"] for r in rows}
    out = {}
    for kind in sorted(label_of, key=lambda k: (-label_of[k], k)):  # positive kinds first
        idx = [i for i, r in enumerate(rows) if r["kind"] == kind]
        hit = sum(flags[i] for i in idx)
        lo, hi = wilson_interval(hit, len(idx))
        label = label_of[kind]
        out[kind] = {"label": label, "n": len(idx), "flagged": hit, "share": hit / len(idx),
                     "ci95": [round(lo, 3), round(hi, 3)],
                     "errors": [rows[i]["text"] for i in idx if flags[i] != bool(label)]}
    return out


def _summary(flags: list[bool], rows: list[dict]) -> dict:
    from .ratings import wilson_interval

    out = {}
    for name, label in (("recall", 1), ("false_positive_rate", 0)):
        idx = [i for i, r in enumerate(rows) if r["label"] == label]
        hit = sum(flags[i] for i in idx)
        out[name] = {"share": hit / len(idx), "n": len(idx), "count": hit,
                     "ci95": [round(x, 3) for x in wilson_interval(hit, len(idx))]}
    return out


def evaluate(out: Path | None = None) -> dict:
    """Both classifiers on their held-out test splits: share flagged per kind (recall for the unsafe
    / crisis kinds, false positives for the others) with Wilson 95% intervals, the regex-only
    baseline, and time per message."""
    crisis_rows = [r for r in load_labelled(CRISIS_DATA, "positive") if r["split"] == "test"]
    reply_rows = [r for r in load_labelled(REPLY_DATA, "unsafe") if r["split"] == "test"]
    det, flt = detector(), output_filter()
    verdicts = [det.check(r["text"]) for r in crisis_rows]
    flags = [v.flag for v in verdicts]
    patterns = [pattern_flag(r["text"]) for r in crisis_rows]
    reply_verdicts = [flt.check(r["text"]) for r in reply_rows]
    reply_flags = [v.flag for v in reply_verdicts]
    words_only = [bool(blocked_terms(r["text"])) for r in reply_rows]
    ms = [1000 * v.seconds for v in verdicts + reply_verdicts]
    kinds = _kind_table(flags, crisis_rows)
    targets = {"explicit recall = 100%": kinds["explicit"]["share"] == 1.0,
               "implicit recall >= 90%": kinds["implicit"]["share"] >= 0.9,
               "false positives <= 5%": _summary(flags, crisis_rows)["false_positive_rate"]["share"] <= 0.05,
               "<= 50 ms per message (median)": float(np.median(ms)) <= 50}
    report = {
        "data": {
            "crisis": str(CRISIS_DATA.relative_to(DATA_DIR.parent)),
            "replies": str(REPLY_DATA.relative_to(DATA_DIR.parent)),
            "split": "test = a quarter of the texts by sha1(text), never used for fitting or thresholds",
        },
        "crisis_detector": {
            "method": "logistic regression on all-MiniLM-L6-v2 embeddings + character n-grams"
            + (" OR regular expressions" if det.use_patterns else ""),
            "chosen_on_train_cv": det.cv,
            **_summary(flags, crisis_rows),
            "by_kind": kinds,
            "patterns_only": {**_summary(patterns, crisis_rows), "by_kind": _kind_table(patterns, crisis_rows)},
        },
        "output_filter": {
            "method": (
                "logistic regression on all-MiniLM-L6-v2 embeddings + character n-grams, plus configs/safety.yaml"
            ),
            "chosen_on_train_cv": flt.cv,
            **_summary(reply_flags, reply_rows),
            "by_kind": _kind_table(reply_flags, reply_rows),
            "word_list_only": {**_summary(words_only, reply_rows), "by_kind": _kind_table(words_only, reply_rows)},
        },
        "ms_per_message": {"median": round(float(np.median(ms)), 1), "p95": round(float(np.quantile(ms, 0.95)), 1)},
        "targets": targets,
    }
    if out is not None:
        from .io import write_json_atomically

        write_json_atomically(Path(out), report)
    return report


def _print(report: dict) -> None:
    for part in ("crisis_detector", "output_filter"):
        r = report[part]
        print(f"\n{part}: {r['method']}")
        for kind, k in r["by_kind"].items():
            what = "recall" if k["label"] else "false alarms"
            print(f"  {kind:24s} {what:12s} {k['flagged']:3d}/{k['n']:<3d} = {100 * k['share']:5.1f}%  "
                  f"[{100 * k['ci95'][0]:.0f}, {100 * k['ci95'][1]:.0f}]")
        for name in ("recall", "false_positive_rate"):
            x = r[name]
            print(f"  {name:37s} {x['count']:3d}/{x['n']:<3d} = {100 * x['share']:5.1f}%  "
                  f"[{100 * x['ci95'][0]:.0f}, {100 * x['ci95'][1]:.0f}]")
    print(f"\ntime per message: {report['ms_per_message']}")
    print("targets:", json.dumps(report["targets"], indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.safety")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("evaluate", help="measure the detector and the output filter on their held-out splits")
    p.add_argument("--out", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    _print(evaluate(Path(args.out) if args.out else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
