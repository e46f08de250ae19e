"""What the classifiers read of a text, and the explicit layers beside them: the regular expressions
(``pattern_flag``), the output filter's word list (``blocked_terms``), whether a text can be judged at all
(``readable``, ``language_doubt``), and the pieces a long text is read in (``pieces``, ``chunks``)."""
from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

import yaml

from ..paths import CONFIGS_DIR
from .settings import CHUNK_CHARS, LANGUAGE_CHARS, LANGUAGE_DOUBT

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
