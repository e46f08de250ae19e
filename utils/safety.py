"""Safety helpers for the dashboard and the evaluation outputs.

- ``crisis_flag``: does a text mention self-harm or a crisis? Offline patterns: explicit
  phrasings ("I want to kill myself", "end my life"), implicit ones ("no reason to go on",
  "everyone would be better off without me"), minus common hyperbole ("I could kill myself
  laughing", "this traffic is killing me").
- ``blocked_terms``: an unsafe-output filter over configurable word/pattern lists
  (``configs/safety.yaml``); what it blocks is shown as blocked, not silently dropped.
"""
from __future__ import annotations

import re
from functools import lru_cache

import yaml

from .paths import CONFIGS_DIR

HELP_NOTICE = (
    "If you are thinking about harming yourself or are in crisis, please reach out now: call your local "
    "emergency number, or a crisis line such as 988 (US), 116 123 (Samaritans, UK and Ireland), or find one at "
    "findahelpline.com. This demo is a research tool and cannot help in an emergency."
)
RESEARCH_NOTE = ("Research demo: outputs come from small language models, may be wrong or inappropriate, "
                 "and are not a substitute for professional advice.")

_EXPLICIT = [
    r"\b(kill(ing)?|hurt(ing)?|harm(ing)?|cut(ting)?)\s+my\s*self\b", r"\bsuicid(e|al)\b", r"\bend(ing)?\s+(my|it\s+all|my\s+own)\s*(life)?\b",
    r"\btake\s+my\s+(own\s+)?life\b", r"\bwant(ed)?\s+to\s+die\b", r"\bself[-\s]?harm", r"\boverdose\b",
    r"\bdon'?t\s+want\s+to\s+(live|be\s+alive|wake\s+up)\b",
]
_IMPLICIT = [
    r"\bno\s+(reason|point)\s+(to|in)\s+(go(ing)?\s+on|liv(e|ing))\b", r"\bbetter\s+off\s+without\s+me\b",
    r"\bcan'?t\s+go\s+on\b", r"\b(wish|want)\s+i\s+(was|were)\s+(dead|never\s+born)\b", r"\bnot\s+be\s+here\s+anymore\b",
    r"\bgoodbye\s+forever\b", r"\bgive\s+up\s+on\s+(life|everything)\b",
]
_HYPERBOLE = [
    r"\bkill\s+my\s*self\s+(laughing|with\s+laughter)\b", r"\b(killing|kills)\s+me\b", r"\bdying\s+(to|of\s+laughter)\b",
    r"\bdie\s+of\s+(embarrassment|laughter|boredom)\b", r"\bkill\s+(the|a|this)\s+(process|task|job|lights|engine)\b",
    r"\bsuicide\s+(squad|doors?|mission)\b",
]
_EXPLICIT_RE = [re.compile(p, re.IGNORECASE) for p in _EXPLICIT]
_IMPLICIT_RE = [re.compile(p, re.IGNORECASE) for p in _IMPLICIT]
_HYPERBOLE_RE = [re.compile(p, re.IGNORECASE) for p in _HYPERBOLE]


def crisis_flag(text: str) -> bool:
    """True when ``text`` mentions self-harm or a crisis (hyperbole removed first)."""
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


def evaluate_detector(rows) -> dict:
    """Recall (share of labelled crisis texts flagged) and false-positive rate (share of the
    others flagged), overall and per kind, on rows of {"text", "label", "kind"}."""
    out: dict = {"n": len(rows), "by_kind": {}}
    pos = [r for r in rows if r["label"] == 1]
    neg = [r for r in rows if r["label"] == 0]
    out["recall"] = sum(crisis_flag(r["text"]) for r in pos) / len(pos) if pos else None
    out["false_positive_rate"] = sum(crisis_flag(r["text"]) for r in neg) / len(neg) if neg else None
    for kind in sorted({r["kind"] for r in rows}):
        sub = [r for r in rows if r["kind"] == kind]
        flagged = sum(crisis_flag(r["text"]) for r in sub)
        out["by_kind"][kind] = {"n": len(sub), "flagged": flagged, "label": sub[0]["label"],
                                "missed": [r["text"] for r in sub if r["label"] == 1 and not crisis_flag(r["text"])],
                                "false_alarms": [r["text"] for r in sub if r["label"] == 0 and crisis_flag(r["text"])]}
    return out
