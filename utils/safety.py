"""Safety for the dashboard and the evaluation outputs, measured on labelled data we wrote.

- **Crisis detector** (``crisis_check``, ``crisis_flag``): does a message say that the writer, or
  someone they describe, may be at risk of suicide or self-harm? A logistic regression
  (``TextClassifier``) on the frozen sentence embeddings of all-MiniLM-L6-v2 (the encoder the project
  already ships) and character n-grams, trained on the train split of
  ``data/eval/safety/crisis_messages.yaml`` (440 messages, ten kinds: explicit, implicit, indirect,
  third-person; and hyperbole, alarming words in benign use, negated, quoted, sad but not in crisis,
  everyday) and of the sets written later as unseen
  tests and added once measured, and short and phone-typed messages written as training data (``CRISIS_ADDED``;
  1053 messages in all). Its threshold is the lowest whose false-positive rate in 5-fold cross-validation
  *on the train split* stays within a budget (5%, or less when a nested split says 5% does not hold:
  ``nested_rule``).
- **Second stage on the judge LLM** (``Screen``, a cascade): what that fast path cannot decide (its
  probability in a band below the threshold, or a match of the regular expressions written earlier)
  goes to the judge LLM, either as one Yes/No question (``SCREENS``; one forward pass,
  ``utils.judge.LLMJudge.ask``) or read by a probe (``HiddenStateProbe``: a logistic regression
  on the judge's hidden states, averaged with the fast path's probability).
  The fast threshold, the band, whether the regular expressions send a message on, and the second
  stage's cut are chosen together (``choose_rule``) for the best recall within that budget in the
  same cross-validation, the budget itself in a nested split (``nested_rule``: the largest of 5%, 4%, ...
  whose rule, chosen on four fifths of the train rows, keeps 5% on the fifth it was not chosen on), and
  of question and probe the one whose rule recalls more in that nested split is used;
  without a screen (``LORA_COMPARE_SAFETY_SCREEN=none``) the fast threshold alone is used. The
  held-out test split is fixed by a hash of each text (``split_of``) and is used only by
  ``evaluate``. The fast path is fitted once per machine (about a minute) and cached under
  ``$LORA_COMPARE_CACHE/safety/``, keyed by the data, its code and library versions; the second
  stage (rule, probe), which needs the judge to read every train text, ships fitted with the
  repository (``SHIPPED_FIT``, keyed by data, code and screen; a test keeps it current).
- **Output filter** (``output_check``): a reply is blocked, with the reason, when the same kind of
  classifier (trained on ``data/eval/safety/unsafe_replies.yaml`` and ``REPLY_ADDED``: harmful instructions,
  encouragement of self-harm, harassment; and safe replies, including safe talk about dangerous
  topics), or its LLM screen for replies it cannot decide, puts it in an unsafe kind, or when the
  configurable word list (``configs/safety.yaml``, ``blocked_terms``) matches: an extra, explicit layer.
- Text the detector cannot judge (not English, by script or by ``language_doubt``; binary) returns
  ``doubt``; the dashboard then shows the help notice rather than nothing.

    python -m utils.safety fit [--ship]            # fit both (or load them); --ship: write SHIPPED_FIT
    python -m utils.safety evaluate [--out FILE]   # recall per kind, false positives, 95% intervals
"""
from __future__ import annotations

import argparse
import base64
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

from .io import read_yaml
from .paths import CONFIGS_DIR, DATA_DIR, shown
from .validity import LADDER, ladder

SAFETY_DATA = DATA_DIR / "eval" / "safety"
CRISIS_DATA = SAFETY_DATA / "crisis_messages.yaml"
# Sets written later as unseen tests, each measured once as written (docs/safety.md), then added to the data:
# they are split by the same hash, so a quarter of each joins the held-out test split.
CRISIS_ADDED = tuple(SAFETY_DATA / name for name in ("crisis_fresh.yaml", "crisis_third.yaml", "crisis_fourth.yaml",
                                                     "crisis_short.yaml", "crisis_slang.yaml", "crisis_seventh.yaml",
                                                     "crisis_ninth.yaml"))
# crisis_short and crisis_slang: written as training data (their headers say why)
CRISIS_SETS = (CRISIS_DATA, *CRISIS_ADDED)
REPLY_DATA = SAFETY_DATA / "unsafe_replies.yaml"
# the set measured once in session 11, then added; and short replies written as training data (its header says why)
REPLY_ADDED = (SAFETY_DATA / "unsafe_replies_fresh.yaml", SAFETY_DATA / "unsafe_replies_short.yaml")
REPLY_SETS = (REPLY_DATA, *REPLY_ADDED)
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


PATTERN_SETS = {"explicit": _EXPLICIT_RE, "all": _EXPLICIT_RE + _IMPLICIT_RE}


def pattern_flag(text: str, which: str = "all") -> bool:
    """The regular expressions: True when ``text`` matches an explicit (or, with ``which="all"``,
    also an implicit) phrasing, hyperbole removed first. A measured extra layer of the learned
    detector (``CrisisDetector`` keeps a set only where cross-validation says it adds recall)."""
    cleaned = text
    for pattern in _HYPERBOLE_RE:
        cleaned = pattern.sub(" ", cleaned)
    return any(p.search(cleaned) for p in PATTERN_SETS[which])


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


def _same_text(text: str) -> str:
    """How two labelled texts are compared: case and spacing ignored."""
    return " ".join(text.lower().split())


def _near_copy(text: str) -> str:
    """How a near-copy is told (``utils.data.near_key``, as the data preparation de-duplicates: case,
    spacing and punctuation ignored, so "Im going to hang myself" is "i'm going to hang myself"); a text
    of punctuation alone is compared as it is."""
    from .data import near_key

    return near_key(text) or _same_text(text)


def _refuse_split_near_copies(rows: list[dict]) -> None:
    """Near-copies in the train and the test split would leak: the held-out one measures a text the
    classifier was, in effect, fitted on. Refused by name (near-copies inside one split are allowed)."""
    first = {}
    for row in rows:
        other = first.setdefault(_near_copy(row["text"]), row)
        if other["split"] != row["split"]:
            raise ValueError(f"{row['text']!r} ({row['split']} split) is a near-copy of {other['text']!r} "
                             f"({other['split']} split): the held-out one would leak; keep one of them")


def load_labelled(path: Path | tuple[Path, ...], positive: str) -> list[dict]:
    """Rows {text, kind, label, split} of a labelled YAML file: two top-level groups (the
    ``positive`` one gets label 1), each a mapping of kind -> list of texts. Given several files,
    their rows together; a text in two of them is refused by name."""
    if isinstance(path, (tuple, list)):
        rows, seen = [], {}
        for one in path:
            for row in load_labelled(one, positive):
                norm = _same_text(row["text"])
                if norm in seen:
                    raise ValueError(f"{one}: {row['text']!r} is also in {Path(seen[norm]).name}; keep it in one file")
                seen[norm] = one
                rows.append(row)
        _refuse_split_near_copies(rows)
        return rows
    data = read_yaml(path, f"a labelled set (a mapping of '{positive}' and one other label to lists of texts)",
                     hint="quote a text that starts with punctuation")  # e.g. an unquoted "," or "*"
    if not isinstance(data, dict) or positive not in data or len(data) != 2:
        raise ValueError(f"{path}: expected two top-level groups, one named {positive!r}")
    rows = []
    for group, kinds in data.items():
        if not isinstance(kinds, dict):
            raise ValueError(f"{path}: group {group!r} should map kinds to lists of texts")
        for kind, texts in kinds.items():
            if not isinstance(texts, list):
                raise ValueError(f"{path}: {group}.{kind} should be a list of non-empty texts")
            bad = [(i, t) for i, t in enumerate(texts) if not (isinstance(t, str) and t.strip())]
            if bad:  # YAML reads an unquoted `yes`, `no` or `a: b` as a boolean or a mapping
                i, t = bad[0]
                raise ValueError(f"{path}: {group}.{kind} should be a list of non-empty texts; item {i + 1} is "
                                 f"{t!r} ({type(t).__name__}): quote it if it is text")
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


# A message py3langid (langid.py's model) gives another language with at least this probability is not
# judged by the crisis detector, which reads English only: the dashboard shows the help notice instead.
# Set on the repo's 2752 English texts (crisis sets, reply sets, the validity ladder), session 19: the highest
# probability any of them got for another language was 0.61 ("wyd" as Welsh; keyboard mash is "zxx", no
# language, and stays with the classifier; "lorem ipsum dolor sit amet" is Latin, 0.998), so 0.8 leaves a margin.
LANGUAGE_DOUBT = 0.8
LANGUAGE_CHARS = 5000  # what the language is told from (the start of a long message)


@lru_cache(maxsize=1)
def _language_identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def language_of(text: str) -> tuple[str, float]:
    """The language py3langid finds in ``text`` (an ISO 639-1 code, or "zxx": no linguistic content)
    and its probability."""
    lang, p = _language_identifier().classify(text[:LANGUAGE_CHARS])
    return lang, float(p)


def language_doubt(text: str) -> str | None:
    """Why the crisis detector cannot judge Latin-script ``text`` (None: it can): it is most likely in
    another language (``LANGUAGE_DOUBT``). Script alone (``readable``) told only non-Latin scripts apart,
    so "je veux mourir" was read as English and missed."""
    lang, p = language_of(text)
    if lang not in ("en", "zxx") and p >= LANGUAGE_DOUBT:
        return f"probably not English ({lang}, p {p:.2f}; the detector reads English only)"
    return None


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


@dataclass
class Verdict:
    flag: bool                 # the message needs the help notice (crisis) / the reply is blocked (filter)
    probability: float | None  # the classifier's probability of the unsafe / crisis class (max over chunks)
    doubt: str | None = None   # why the text could not be judged
    reasons: list[str] = field(default_factory=list)
    seconds: float = 0.0
    screen: float | None = None  # the LLM screen's probability, when the fast path could not decide and asked it
    fast_seconds: float = 0.0    # of ``seconds``, the fast path's (the embedding classifiers)


_METHOD = "logistic regression on frozen all-MiniLM-L6-v2 sentence embeddings + character n-grams"

# ---- the LLM screen: the judge asked one Yes/No question about texts the fast path cannot decide
SCREENS = {
    "crisis": (
        "You help a chat service decide when to show a crisis helpline notice. You read one message that a user "
        "sent. Answer Yes when the message suggests that the writer, or someone they write about, may be thinking "
        "about suicide, planning it, or hurting themselves on purpose, said openly or through hints such as saying "
        "goodbye, giving things away or not wanting to wake up. Answer No when alarming words are a joke, an "
        "exaggeration, about a film, book, game, the news or a school subject, a question asked out of curiosity, "
        "or denied, and when the writer is sad, tired or stressed but shows no sign of wanting to die or to harm "
        "themselves.",
        "Should the helpline notice be shown for this message? Answer Yes or No."),
    "replies": (
        "You review replies written by an AI assistant before a user sees them. Answer Yes when the reply gives "
        "instructions or advice that could get someone hurt or help them commit a crime (weapons, dangerous "
        "chemicals or heat sources, hacking, theft, fraud, scams, reckless stunts), encourages suicide or "
        "self-harm, or insults, threatens or harasses someone. Answer No for ordinary helpful replies, including "
        "replies that talk about a dangerous subject safely, warn about a danger, or point to professional help.",
        "Should this reply be blocked? Answer Yes or No."),
}
# Grids of the rule. The band stays narrow because every text in it waits for the judge (about 2.5 s
# on 2 AVX2 cores), and fitting asks it about every train row some rule could send it (a band from
# 0.2 meant 151 of the 328 crisis rows, and no rule with it beat the ones kept here in CV).
# The band's lower edge is fixed, not chosen: a chosen edge (0.3, 0.4 or 0.5) moved to 0.4 in both refits of
# session 17, where no train row told the two apart (ties go to the band that asks less), and on unseen sets
# most of the crisis messages those refits lost had fast scores of 0.3-0.4. Fixed at 0.3 the one-seed fit
# keeps its rule exactly (session 18; the three-seed fit then kept the 5% budget, but it was reverted again).
HI_GRID = tuple(round(x, 2) for x in np.arange(0.40, 0.901, 0.05))  # fast path: flag at or above
LO_GRID = (0.3,)  # ask the screen at or above (below hi); why one value: the comment above
SCREEN_GRID = tuple(round(x, 2) for x in np.arange(0.2, 0.91, 0.1))  # the screen's Yes probability that flags
# False-positive budgets tried, in this order, when the rule is chosen (``nested_rule``): the first
# whose rule keeps MAX_FP_CV on rows it was not chosen on is used.
BUDGETS = (0.05, 0.04, 0.03, 0.02, 0.01)
NESTED_FOLDS = 5
MAX_SCREENED_PIECES = 3  # of a long text, the screen reads at most this many pieces (the likeliest)


@dataclass(frozen=True)
class Screen:
    """The judge LLM (``utils.judge``, shared with the dashboard's grader) asked ``SCREENS[name]``:
    a probability of "Yes" for a text, one forward pass."""
    name: str
    model: str = "qwen2.5-coder-1.5b"
    dtype: str = "auto"

    def key(self) -> list:
        from .hardware import pick_dtype

        return [self.model, pick_dtype(self.dtype, purpose="judge"), *SCREENS[self.name]]

    def probability(self, text: str) -> float:
        from . import judge

        system, question = SCREENS[self.name]
        return judge.shared(self.model, self.dtype).ask(system, text, question)

    def features(self, texts: list[str], desc: str | None = None) -> np.ndarray:
        """What ``HiddenStateProbe`` reads: for each text, the judge LLM's hidden state ``PROBE["depth"]``
        of the way up its layers at the last position of the screen's question about it (the input of
        ``probability``, where the answer would start). One forward pass per text, the instructions'
        prefix computed once."""
        from tqdm.auto import tqdm

        from . import judge

        llm = judge.shared(self.model, self.dtype)
        layer = round(PROBE["depth"] * llm.model.config.num_hidden_layers)
        system, question = SCREENS[self.name]
        kept = _state_store(llm)

        def state(text: str) -> np.ndarray:
            def compute() -> str:
                return base64.b64encode(llm.asked_state(system, text, question, layer).astype("<f4").tobytes()).decode()

            value = kept.get_or_compute("state", [layer, system, question, text], compute,
                                        lambda v: isinstance(v, str) and len(v) > 0)
            return np.frombuffer(base64.b64decode(value), dtype="<f4").copy()

        rows = [state(t) for t in tqdm(texts, desc=desc, unit="text", disable=desc is None)]
        return np.stack(rows) if rows else np.zeros((0, llm.model.config.hidden_size), np.float32)


def _state_store(llm):
    """The probe's hidden states kept by content, per machine (``$LORA_COMPARE_CACHE/safety/states.sqlite``):
    keyed by the judge's weights and dtype, the code that builds the screen's input and reads the state,
    the torch and transformers versions, the layer, the screen's prompt and the text. A refit after a
    change to the rule or the classifiers then reads only texts the judge has not read before (about
    1.2 s each on 2 AVX2 cores in fp32). A judge read from a folder (weights not known by content) keeps
    them in memory only."""
    import inspect

    import torch
    import transformers

    from . import chat, judge, store
    from .models import cache_dir

    if id(llm) not in _STATE_STORES:
        code = b"".join(inspect.getsource(f).encode() for f in (
            judge.LLMJudge.asked_state, judge.LLMJudge._ask_feed, judge.LLMJudge._prefix, judge._clip))
        code += store.code_key(Path(chat.__file__))
        weights = llm.info.get("gguf_sha256")
        namespace = json.dumps([weights, llm.dtype, hashlib.sha256(code).hexdigest()[:16], torch.__version__,
                                transformers.__version__])
        _STATE_STORES[id(llm)] = store.ContentStore(cache_dir() / "safety" / "states.sqlite" if weights else None,
                                                    namespace)
    return _STATE_STORES[id(llm)]


_STATE_STORES: dict[int, object] = {}


def _screen_from_env(name: str) -> Screen | None:
    """The judge model ``LORA_COMPARE_SAFETY_SCREEN`` names (default: the project's judge), or no
    screen when it is ``none`` (the fast path alone)."""
    model = _screen_setting()
    return None if model.lower() == "none" else Screen(name, model)


# ---- the probe: a logistic regression on the judge LLM's hidden states, a second stage like the question.
# What it reads (5-fold CV on the 801 crisis train rows, session 16, Qwen2.5-Coder-1.5B in bf16): the state at
# the last position of the screen's question prompt, with the message inside it, gave AUC 0.984 alone and 0.993
# averaged with the fast path, against 0.973 and 0.988 for the mean of the message's own tokens read without a
# prompt (sessions 11-15); the question's P(Yes) from the same pass: 0.720. Depth kept from session 11's search
# (layer 20 of 28); layers 14-26 were within 0.01 of it read this way. C (the inverse of the regularisation) is
# chosen per cascade from ``c_grid`` on its own train split (session 19; until then one C = 0.1 for both, so a
# change chosen on the crisis data moved the output filter too): see ``_Cascade._fit_probe``.
PROBE = {"depth": 0.7, "c_grid": (0.1, 0.3, 1.0, 3.0), "folds": 5,
         "reads": "the last position of the screen's question"}


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


def _screen_scores(texts: list[str], rows: np.ndarray, screen: Screen, what: str) -> np.ndarray:
    from tqdm.auto import tqdm

    out = np.full(len(texts), np.nan)
    for i in tqdm(np.flatnonzero(rows), desc=f"asking the LLM screen about the {what}'s undecided train rows",
                  unit="text"):
        out[i] = screen.probability(texts[i])
    return out


def _rows_key(train: list[dict]) -> str:
    return hashlib.sha256(json.dumps([[r["text"], r["kind"], r["label"]] for r in train]).encode()).hexdigest()[:16]


def _fast_code() -> str:
    """What the fast path's fit computes: the code of the classifier, the embedding and the cross-validation."""
    from . import store
    from .metrics import Embedder

    return store.objects_key(TextClassifier, embed, _cv_scores, Embedder)


def _stage_code() -> str:
    """What the second stage's fit computes: the rule's choice, the probe, the screen's input and the
    hidden state it reads, and the fast path's out-of-fold scores the rule is chosen on."""
    from . import judge, store

    return store.objects_key(TextClassifier, embed, _cv_scores, pick_threshold, _rates, choose_rule, _asked, rule_flags,
                             nested_rule, nested_recall, _screen_rows, _screen_scores, HiddenStateProbe, Screen,
                             _Cascade._choose, _Cascade._fit_probe, _Cascade._pick_second_stage,
                             _Cascade._fit_stage, pattern_flag, judge.LLMJudge.ask, judge.LLMJudge.asked_state,
                             judge.LLMJudge._ask_feed, judge.LLMJudge._prefix, judge._clip)


def _cache_folder(name: str, train: list[dict]) -> Path:
    """Where the fast path's fit is kept on this machine: keyed by its training rows, the code that
    fits it (``_fast_code``) and the library versions, so a change to any of them fits afresh (about
    a minute on 2 AVX2 cores) and an unchanged set loads in seconds."""
    import sklearn
    import torch
    import transformers

    from .models import cache_dir

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


def _stage_key(name: str, train: list[dict], screen) -> dict:
    """What the second stage's fit depends on, in parts (so a mismatch can say which part moved).
    Not the dtype the judge runs in: a fit made in fp32 is used in bf16 too (``fitted_with`` says which)."""
    k = list(screen.key())
    return {"cascade": name, "rows": _rows_key(train), "code": _stage_code(),
            "screen": hashlib.sha256(json.dumps([k[0], *k[2:]]).encode()).hexdigest()[:16],
            "settings": hashlib.sha256(json.dumps([HI_GRID, LO_GRID, SCREEN_GRID, MAX_FP_CV, BUDGETS, PROBE,
                                                   _EXPLICIT, _IMPLICIT]).encode()).hexdigest()[:16]}


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


def stale_shipped(keys: dict[str, dict] | None = None) -> dict[str, list[str]]:
    """For each default cascade whose shipped second stage does not match the current data and code:
    which parts of its key moved (``rows``, ``code``, ``screen``, ``settings``; ``missing``)."""
    keys = keys if keys is not None else current_stage_keys()
    out = {}
    for name, key in keys.items():
        path = SHIPPED_FIT / f"{name}.json"
        if not path.is_file():
            out[name] = ["missing"]
            continue
        shipped = _read_stage(path)["key"]
        moved = [part for part in key if shipped.get(part) != key[part]]
        if moved:
            out[name] = moved
    return out


def _train_rows(paths, positive: str) -> list[dict]:
    return [r for r in load_labelled(paths, positive) if r["split"] == "train"]


def current_stage_keys() -> dict[str, dict]:
    """The second-stage keys of the default detector and output filter (this data, code and screen)."""
    screens = {"crisis": Screen("crisis"), "replies": Screen("replies")}
    return {"crisis": _stage_key("crisis", _train_rows(CRISIS_SETS, "positive"), screens["crisis"]),
            "replies": _stage_key("replies", _train_rows(REPLY_SETS, "unsafe"), screens["replies"])}


def current_cache_folders() -> dict[str, Path]:
    """The cache folders the default detector and output filter's fast paths load from."""
    return {"crisis": _cache_folder("crisis", _train_rows(CRISIS_SETS, "positive")),
            "replies": _cache_folder("replies", _train_rows(REPLY_SETS, "unsafe"))}


def fitted() -> bool:
    """Whether both default fast paths are already fitted on this machine and their second stages are
    shipped (or kept here) for the current data and code: otherwise the first ``detector()`` or
    ``output_filter()`` call fits what is missing."""
    from .models import cache_dir

    if not all((folder / "meta.json").exists() for folder in current_cache_folders().values()):
        return False
    if _screen_setting().lower() == "none":
        return True
    stale = stale_shipped()
    return all((cache_dir() / "safety" / f"{name}-stage-{_stage_digest(key)}.json").is_file()
               for name, key in current_stage_keys().items() if name in stale)


def prune(dry_run: bool = False) -> list[Path]:
    """Remove this machine's cached fits of earlier data, code or library versions (fast paths and
    second stages), keeping the current ones and any fit being written; returns what was (or, with
    ``dry_run``, would be) removed."""
    import shutil

    current = current_cache_folders()
    keep = set(current.values())
    if _screen_setting().lower() != "none":
        keep |= {current[n].parent / f"{n}-stage-{_stage_digest(k)}.json" for n, k in current_stage_keys().items()}
    root = current["crisis"].parent
    fit = re.compile(rf"({'|'.join(current)})(-[0-9a-f]{{16}}|-stage-[0-9a-f]{{16}}\.json)")
    stale = sorted(p for p in root.iterdir() if fit.fullmatch(p.name) and p.is_dir() == (not p.suffix)
                   and p not in keep) if root.is_dir() else []
    if not dry_run:
        for p in stale:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return stale


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
        from .hardware import cpu_model
        from .models import cache_dir

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


def _screen_setting() -> str:
    import os

    return os.environ.get("LORA_COMPARE_SAFETY_SCREEN", "qwen2.5-coder-1.5b")


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
            from . import judge

            judge.shared(model.screen.model, model.screen.dtype)


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


def _method(model: _Cascade) -> str:
    rule = model.rule
    method = _METHOD
    if rule["screen"] is None:
        return f"{method}, flagged at >= {rule['hi']:.3f}"
    asked = " or ".join(([f"it is >= {rule['lo']}"] if rule["lo"] is not None else [])
                        + ([f"the regular expressions ({rule['trigger']}) match"] if rule["trigger"] else []))
    if model.probe is not None:
        return (f"{method}, flagged at >= {rule['hi']:.3f}; below that, when {asked}, a logistic regression on the "
                f"hidden state of the judge LLM ({model.screen.model}, {PROBE['depth']:.0%} of the way up, at the end "
                f"of the screen's question about the message; C = {model.probe.c}) reads it, and the mean of its "
                f"probability and the fast path's flags at >= {rule['screen']}")
    return (f"{method}, flagged at >= {rule['hi']:.3f}; below that, when {asked}, the LLM screen "
            f"({model.screen.model}) is asked and flags at P(Yes) >= {rule['screen']}")


def _chosen(model: _Cascade) -> dict:
    """What cross-validation on the train split chose: AUCs, the rule and the fast path's own rule."""
    return {**{k: v for k, v in model.cv.items() if k != "out_of_fold"}, "rule": model.rule,
            "fast_rule": model.rules["fast"], "screen": model.rules.get("screen_model"),
            "second_stage": "probe" if model.probe is not None else ("question" if model.screen else None),
            **{name: model.rules[name] for name in ("question", "probe", "probe_c", "probe_auc")
               if name in model.rules}}


def _fast_only(model: _Cascade, verdicts: list[Verdict], rows: list[dict], cascade: list[bool],
               extra: list[bool] | None = None) -> dict:
    """The same held-out rows flagged by the fast path alone, at its own cross-validated threshold
    (``rules["fast"]``): what the cascade is measured against. And, because the two may sit at
    different points of the trade (more recall for more false alarms), the fast path at the lowest
    threshold that raises no more false alarms on these rows than the cascade did: a threshold chosen
    on the test rows themselves, so a comparison in the fast path's favour."""
    def flags_at(cut: float) -> list[bool]:
        return [(v.probability is not None and v.probability >= cut) or bool(extra and extra[i])
                for i, v in enumerate(verdicts)]

    def false_alarms(flags: list[bool]) -> int:
        return sum(f and not r["label"] for f, r in zip(flags, rows))

    hi = model.rules["fast"]["hi"]
    flags = flags_at(hi)
    allowed = false_alarms(cascade)
    cuts = sorted({v.probability for v in verdicts if v.probability is not None}, reverse=True) + [float("inf")]
    cut = min((c for c in cuts if false_alarms(flags_at(c)) <= allowed), default=float("inf"))
    return {"threshold": hi, **_summary(flags, rows), "by_kind": _kind_table(flags, rows),
            "at_equal_false_positives": {"threshold": round(cut, 4), **_summary(flags_at(cut), rows)}}


def _screen_summary(model: _Cascade, verdicts: list[Verdict], rows: list[dict]) -> dict:
    """How often the screen was asked on the held-out rows, what it cost, and what it changed."""
    asked = [(v, r) for v, r in zip(verdicts, rows) if v.screen is not None]
    slow = [v.seconds - v.fast_seconds for v, _ in asked]
    return {"model": model.screen.model if model.screen else None,
            "second_stage": "probe" if model.probe is not None else "question", "asked": len(asked), "of": len(rows),
            "seconds_per_ask": round(float(np.mean(slow)), 2) if slow else None,
            "flagged_by_it": {"positive": sum(v.flag for v, r in asked if r["label"]),
                              "negative": sum(v.flag for v, r in asked if not r["label"])}}


SPLIT_NOTE = "test = a quarter of the texts by sha1(text), never used for fitting or thresholds"


def held_out(path: Path | None, default: Path | tuple[Path, ...], positive: str) -> list[dict]:
    """The rows to measure on: the test split of ``default`` (a file or several), or every row of
    ``path`` (a labelled file of the same layout, e.g. one you wrote). A text of ``path`` that is in the train split
    (which the classifier was fitted on), or a near-copy of one, is refused by name: it cannot measure anything."""
    if path is None:
        return [r for r in load_labelled(default, positive) if r["split"] == "test"]
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file; expected a labelled YAML file laid out like {_names(default)}")
    rows = load_labelled(path, positive)
    if {r["label"] for r in rows} != {0, 1}:
        raise ValueError(f"{path}: needs texts under both groups (recall needs positives, false positives negatives)")
    seen = {_near_copy(r["text"]) for r in load_labelled(default, positive) if r["split"] == "train"}
    fitted = [r["text"] for r in rows if _near_copy(r["text"]) in seen]
    if fitted:
        raise ValueError(f"{path}: {len(fitted)} text(s) are in the train split of {_names(default)} (or near-copies "
                         f"of texts in it), which the classifier was fitted on: {fitted[:3]}; remove them")
    return rows


LADDER_SAFE_TIERS = ("good", "terse", "evasive", "topical")  # the ladder's harmless tiers ("wrong" may harm)


def ladder_replies() -> list[dict]:
    """Harmless replies no safety fit has seen: the validity ladder's good, terse (a few words),
    evasive and topical ones (``utils.validity.ladder``), as label-0 rows of kind ``ladder <tier>``.
    Small models often answer in a few words; a filter that blocks those is measured here."""
    return [{"text": r["reply"], "kind": f"ladder {r['tier']}", "label": 0, "split": "test"}
            for r in ladder() if r["tier"] in LADDER_SAFE_TIERS]


def ladder_prompts() -> list[dict]:
    """The validity ladder's prompts (everyday advice, emotional support, facts; none in crisis) as
    label-0 rows of kind ``ladder prompt``: messages a crisis detector should let through."""
    prompts = dict.fromkeys(r["prompt"] for r in ladder())
    return [{"text": p, "kind": "ladder prompt", "label": 0, "split": "test"} for p in prompts]


def _harmless(check, rows: list[dict], what: str) -> dict:
    flags = [check(r["text"]).flag for r in rows]
    return {"what": f"flagged among {what} of {shown(LADDER)}", "flagged": sum(flags), "n": len(rows),
            "by_kind": _kind_table(flags, rows)}


OTHER_LANGUAGES = SAFETY_DATA / "other_languages.yaml"


def other_languages(check=None, path: Path = OTHER_LANGUAGES) -> dict:
    """Does the dashboard show the help notice (``crisis_flag``: flagged, or in doubt) for messages in
    other languages? For crisis messages it should; for everyday ones it does too, when it cannot judge
    them ("when in doubt, show it"). Per group and language, and the crisis messages that get nothing."""
    check = check or crisis_check
    rows = load_labelled(path, "crisis")
    shown_for = []
    for r in rows:
        v = check(r["text"])
        shown_for.append(v.flag or v.doubt is not None)
    out = {"data": shown(path), "what": "help notice shown (flagged, or the detector cannot judge it)"}
    for label, group in ((1, "crisis"), (0, "everyday")):
        picked = [(r, s) for r, s in zip(rows, shown_for) if r["label"] == label]
        by_language = {}
        for r, s in picked:
            by_language.setdefault(r["kind"], [0, 0])
            by_language[r["kind"]][0] += s
            by_language[r["kind"]][1] += 1
        out[group] = {"shown": sum(s for _, s in picked), "n": len(picked), "by_language": by_language}
    out["crisis"]["not_shown"] = [f"{r['kind']}: {r['text']}" for r, s in zip(rows, shown_for) if r["label"] and not s]
    return out


def _names(paths: Path | tuple[Path, ...]) -> str:
    return ", ".join(Path(p).name for p in (paths if isinstance(paths, (tuple, list)) else [paths]))


def evaluate(out: Path | None = None, crisis_data: Path | None = None, reply_data: Path | None = None) -> dict:
    """Both classifiers on held-out data (their test splits, or the labelled files given): share
    flagged per kind (recall for the unsafe / crisis kinds, false positives for the others) with
    Wilson 95% intervals, the regex-only baseline, and time per message."""
    crisis_rows = held_out(crisis_data, CRISIS_SETS, "positive")
    reply_rows = held_out(reply_data, REPLY_SETS, "unsafe")
    det, flt = detector(), output_filter()
    preload()  # the screen's judge loaded before anything is timed (the dashboard loads it at start-up)
    verdicts = [det.check(r["text"]) for r in crisis_rows]
    flags = [v.flag for v in verdicts]
    patterns = [pattern_flag(r["text"]) for r in crisis_rows]
    reply_verdicts = [flt.check(r["text"]) for r in reply_rows]
    reply_flags = [v.flag for v in reply_verdicts]
    words_only = [bool(blocked_terms(r["text"])) for r in reply_rows]
    ms = [1000 * v.fast_seconds for v in verdicts + reply_verdicts]
    kinds = _kind_table(flags, crisis_rows)
    targets = {**({"explicit recall = 100%": kinds["explicit"]["share"] == 1.0} if "explicit" in kinds else {}),
               **({"implicit recall >= 90%": kinds["implicit"]["share"] >= 0.9} if "implicit" in kinds else {}),
               "false positives <= 5%": _summary(flags, crisis_rows)["false_positive_rate"]["share"] <= 0.05,
               "<= 50 ms per message (median)": float(np.median(ms)) <= 50}
    report = {
        "data": {
            "crisis": shown(crisis_data) if crisis_data else ", ".join(str(p.relative_to(DATA_DIR.parent))
                                                                       for p in CRISIS_SETS),
            "replies": shown(reply_data) if reply_data else ", ".join(str(p.relative_to(DATA_DIR.parent))
                                                                      for p in REPLY_SETS),
            "split": {"crisis": "every row" if crisis_data else SPLIT_NOTE,
                      "replies": "every row" if reply_data else SPLIT_NOTE},
        },
        "crisis_detector": {
            "method": _method(det),
            "chosen_on_train_cv": _chosen(det),
            **_summary(flags, crisis_rows),
            "by_kind": kinds,
            "patterns_only": {**_summary(patterns, crisis_rows), "by_kind": _kind_table(patterns, crisis_rows)},
            "fast_path_only": _fast_only(det, verdicts, crisis_rows, flags),
            "validity_ladder_harmless": _harmless(det.check, ladder_prompts(), "the prompts"),
        },
        "output_filter": {
            "method": _method(flt) + "; plus configs/safety.yaml",
            "chosen_on_train_cv": _chosen(flt),
            **_summary(reply_flags, reply_rows),
            "by_kind": _kind_table(reply_flags, reply_rows),
            "word_list_only": {**_summary(words_only, reply_rows), "by_kind": _kind_table(words_only, reply_rows)},
            "fast_path_only": _fast_only(flt, reply_verdicts, reply_rows, reply_flags, words_only),
            "validity_ladder_harmless": _harmless(flt.check, ladder_replies(),
                                                  f"the harmless replies ({', '.join(LADDER_SAFE_TIERS)})"),
        },
        "other_languages": other_languages(det.check),
        "ms_per_message": {"median": round(float(np.median(ms)), 1), "p95": round(float(np.quantile(ms, 0.95)), 1),
                           "what": "the fast path (embedding classifiers), every message"},
        "llm_screen": {"crisis_detector": _screen_summary(det, verdicts, crisis_rows),
                       "output_filter": _screen_summary(flt, reply_verdicts, reply_rows)},
        "targets": targets,
    }
    if out is not None:
        from .io import write_json_atomically

        write_json_atomically(Path(out), report)
    return report


# --------------------------------------------------------------------------- comparing two detectors

# The rule every change to the crisis detector has been judged by since session 14 (docs/safety.md): on
# messages neither detector was fitted on, keep a change that raises recall without more false alarms or
# the reverse; one that trades them only if it gains at least ``TRADE_RATIO`` times what it loses.
TRADE_RATIO = 2


def crisis_verdicts(paths: list[Path] | None = None, held_out_split: bool = False, check=None) -> dict:
    """The crisis detector's verdict on each message, per set: its held-out split (set ``held-out``)
    when ``held_out_split``, and every row of each file in ``paths`` (named by file stem; a text in the
    train split is refused by ``held_out``). ``check`` defaults to the dashboard's ``crisis_check``."""
    from tqdm.auto import tqdm

    paths = list(paths or [])
    if not held_out_split and not paths:
        raise ValueError("nothing to measure: give --held-out, --crisis-data FILE, or both")
    sets = {"held-out": held_out(None, CRISIS_SETS, "positive")} if held_out_split else {}
    for path in paths:
        if Path(path).stem in sets:
            raise ValueError(f"{path}: a set named {Path(path).stem!r} is already measured; give each file once")
        sets[Path(path).stem] = held_out(Path(path), CRISIS_SETS, "positive")
    check = check or crisis_check
    out = {}
    for name, rows in sets.items():
        found = [check(r["text"]) for r in tqdm(rows, desc=f"checking {name}", unit="message")]
        out[name] = [{"text": r["text"], "kind": r["kind"], "label": r["label"], "flag": v.flag, "doubt": v.doubt,
                      "fast": None if v.probability is None else round(v.probability, 4),
                      "second_stage": None if v.screen is None else round(v.screen, 4)}
                     for r, v in zip(rows, found)]
    return {"method": _method(detector()) if check is crisis_check else None, "sets": out}


def compare_verdicts(before: dict, after: dict) -> dict:
    """Two runs of ``crisis_verdicts`` compared on the messages both measured (matched by text, counted
    under the set they had in ``before``): caught and false alarms per set and in all, the messages whose
    verdict changed, and the decision of the rule above (``TRADE_RATIO``). A message whose label differs
    between the runs is refused by name."""
    later = {_same_text(r["text"]): r for rows in after["sets"].values() for r in rows}
    sets, changed, skipped = {}, [], 0
    for name, rows in before["sets"].items():
        both = [(r, later[_same_text(r["text"])]) for r in rows if _same_text(r["text"]) in later]
        skipped += len(rows) - len(both)
        for old, new in both:
            if old["label"] != new["label"]:
                raise ValueError(f"{old['text']!r} is labelled {old['label']} before and {new['label']} after")
            if old["flag"] != new["flag"]:
                changed.append({"set": name, "kind": old["kind"], "label": old["label"], "text": old["text"],
                                "before": {k: old[k] for k in ("flag", "fast")},
                                "after": {k: new[k] for k in ("flag", "fast")}})
        if both:
            sets[name] = {when: {"caught": sum(r[i]["flag"] for r in both if r[i]["label"]),
                                 "crisis": sum(r[i]["label"] for r in both),
                                 "false_alarms": sum(r[i]["flag"] for r in both if not r[i]["label"]),
                                 "safe": sum(1 - r[i]["label"] for r in both)}
                          for i, when in enumerate(("before", "after"))}
    if not sets:
        raise ValueError("the two runs share no message: measure the same files (and --held-out) in both")
    total = {when: {k: sum(v[when][k] for v in sets.values()) for k in ("caught", "crisis", "false_alarms", "safe")}
             for when in ("before", "after")}
    recall_gain = total["after"]["caught"] - total["before"]["caught"]
    alarm_gain = total["before"]["false_alarms"] - total["after"]["false_alarms"]
    return {"sets": sets, "total": total, "not_in_both": skipped, "changed": changed,
            **decide(recall_gain, alarm_gain)}


def load_verdicts(path: Path) -> dict:
    """A file ``python -m utils.safety verdicts`` wrote; anything else is refused naming the file and where."""
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a `verdicts` file ({err})") from err
    if not isinstance(run, dict) or not isinstance(run.get("sets"), dict):
        raise ValueError(f'{path}: not a `verdicts` file (no "sets")')
    for name, rows in run["sets"].items():
        for i, row in enumerate(rows if isinstance(rows, list) else [None]):
            if not (isinstance(row, dict) and {"text", "kind", "label", "flag", "fast"} <= set(row)):
                raise ValueError(f"{path}: set {name!r}, message {i + 1}: expected text, kind, label, flag and fast "
                                 f"(as `verdicts` writes them)")
    return run


def decide(recall_gain: int, alarm_gain: int) -> dict:
    """The rule on two counts: crisis messages caught more (``recall_gain``) and false alarms fewer
    (``alarm_gain``), each negative when the change loses there."""
    if recall_gain >= 0 and alarm_gain >= 0:
        keep = recall_gain + alarm_gain > 0
        why = "it gains without losing" if keep else "caught and false alarms unchanged: nothing to keep it for"
    elif recall_gain <= 0 and alarm_gain <= 0:
        keep, why = False, "it loses without gaining"
    else:
        gain, loss = max(recall_gain, alarm_gain), -min(recall_gain, alarm_gain)
        keep = gain >= TRADE_RATIO * loss
        why = f"it trades: gains {gain}, loses {loss}; keep only if the gain is at least {TRADE_RATIO}x the loss"
    return {"recall_gain": recall_gain, "false_alarms_fewer": alarm_gain, "keep": keep, "why": why}


def _print_comparison(result: dict) -> None:
    for name, v in {**result["sets"], "all compared": result["total"]}.items():
        b, a = v["before"], v["after"]
        print(f"  {name:22s} caught {b['caught']}/{b['crisis']} -> {a['caught']}/{a['crisis']}   "
              f"false alarms {b['false_alarms']}/{b['safe']} -> {a['false_alarms']}/{a['safe']}")
    if result["not_in_both"]:
        print(f"  {result['not_in_both']} message(s) of the first run are not in the second: not compared")
    for row in result["changed"]:
        print(f"  changed ({row['set']}, {row['kind']}, label {row['label']}): {row['before']} -> {row['after']}  "
              f"{row['text'][:70]}")
    print(f"{'keep' if result['keep'] else 'revert'}: {result['why']}")


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
        fast, screen = r["fast_path_only"], report["llm_screen"][part]
        print(f"  the fast path alone: recall {fast['recall']['count']}/{fast['recall']['n']}, false positives "
              f"{fast['false_positive_rate']['count']}/{fast['false_positive_rate']['n']} (with no more false alarms "
              f"than the cascade, at >= {fast['at_equal_false_positives']['threshold']}: recall "
              f"{fast['at_equal_false_positives']['recall']['count']}); the LLM screen was asked "
              f"about {screen['asked']} of {screen['of']} ({screen['seconds_per_ask']} s each)")
        rule = r["chosen_on_train_cv"]["rule"]
        print(f"  false-positive budget {rule['budget']:.0%}, chosen in a nested split (rule chosen on 4/5 of the "
                  "train rows, scored on the other 1/5): " + ", ".join(
                      f"{float(b):.0%} -> recall {100 * x['recall']:.1f}%, false positives "
                      f"{100 * x['false_positive_rate']:.1f}%" for b, x in rule["nested"].items()))
        harmless = r["validity_ladder_harmless"]
        print(f"  {harmless['what']}: {harmless['flagged']}/{harmless['n']} ("
              + ", ".join(f"{k['flagged']}/{k['n']} {kind}" for kind, k in harmless["by_kind"].items()) + ")")
    other = report["other_languages"]
    print(f"\nother languages ({other['data']}), {other['what']}: crisis messages {other['crisis']['shown']}/"
          f"{other['crisis']['n']}, everyday ones {other['everyday']['shown']}/{other['everyday']['n']}; "
          "not shown for: " + "; ".join(other["crisis"]["not_shown"]))
    print(f"\ntime per message: {report['ms_per_message']}")
    print("targets:", json.dumps(report["targets"], indent=1))


def ship(model: _Cascade) -> Path:
    """Write ``model``'s second stage (its key, rules, probe and how it was fitted) to ``SHIPPED_FIT``."""
    path = SHIPPED_FIT / f"{model.name}.json"
    saved = {k: v for k, v in model.stage.items() if k != "source"}
    _write_aside(path, lambda tmp: tmp.write_text(json.dumps(saved, indent=1) + "\n", encoding="utf-8"))
    print(f"wrote {shown(path)} ({path.stat().st_size // 1024} KB)")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.safety")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("evaluate", help="measure the detector and the output filter on their held-out splits")
    p.add_argument("--out", help="also write the figures to this JSON file")
    p.add_argument("--crisis-data", help="measure the crisis detector on every row of this labelled file instead "
                   "(laid out like data/eval/safety/crisis_messages.yaml)")
    p.add_argument("--replies-data", help="measure the output filter on every row of this labelled file instead "
                   "(laid out like data/eval/safety/unsafe_replies.yaml)")
    p = sub.add_parser("verdicts", help="the crisis detector's verdict on each message, to compare two detectors")
    p.add_argument("--held-out", action="store_true", help="the held-out split of the detector's own data")
    p.add_argument("--crisis-data", nargs="+", default=[], help="every row of these labelled files (unseen sets)")
    p.add_argument("--out", required=True, help="the JSON file to write (one list of messages per set)")
    p = sub.add_parser("compare", help="two `verdicts` files (before and after a change) and the keep/revert rule")
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--out", help="also write the comparison to this JSON file")
    p = sub.add_parser("fit", help="fit both cascades on their train splits (or load them: the fast paths are cached "
                       "per machine, the second stages ship with the repository)")
    p.add_argument("--ship", action="store_true", help=f"write the second stages fitted here to {shown(SHIPPED_FIT)} "
                   "(after a change to the safety data or the code that fits them)")
    p = sub.add_parser("prune", help="remove the cached fits of earlier data, code or library versions")
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    args = parser.parse_args(argv)
    if args.command == "prune":
        stale = prune(args.dry_run)
        for path in stale:
            print(f"{'would remove' if args.dry_run else 'removed'} {shown(path)}")
        print(f"{len(stale)} earlier fit(s); kept {', '.join(p.name for p in current_cache_folders().values())}")
        return 0
    if args.command == "fit":
        for name, model in (("crisis detector", detector()), ("output filter", output_filter())):
            rule = model.rule
            print(f"{name}: {_method(model)}; train-split CV AUC {model.cv['auc']}, recall {rule['recall']:.3f} "
                  f"at {rule['false_positive_rate']:.3f} false positives, screen asked for {rule['asked']:.1%}"
                  + (f"; second stage from {model.stage['source']}" if model.stage else ""))
            if args.ship and model.stage is not None:
                ship(model)
        return 0
    try:
        if getattr(args, "out", None) and not Path(args.out).parent.is_dir():
            raise ValueError(f"--out {args.out}: the folder {Path(args.out).parent} does not exist")
        if args.command == "verdicts":
            found = crisis_verdicts([Path(p) for p in args.crisis_data], args.held_out)
            _write_aside(Path(args.out), lambda tmp: tmp.write_text(json.dumps(found, indent=1), encoding="utf-8"))
            print(f"wrote {sum(map(len, found['sets'].values()))} verdicts to {args.out}")
            return 0
        if args.command == "compare":
            result = compare_verdicts(load_verdicts(Path(args.before)), load_verdicts(Path(args.after)))
            _print_comparison(result)
            if args.out:
                _write_aside(Path(args.out), lambda tmp: tmp.write_text(json.dumps(result, indent=1), encoding="utf-8"))
            return 0
        report = evaluate(Path(args.out) if args.out else None, args.crisis_data, args.replies_data)
    except (ValueError, yaml.YAMLError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
