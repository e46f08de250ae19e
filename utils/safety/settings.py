"""The safety classifiers' settings: the false-positive budgets, the grids the cascade's rule is chosen
from, how much of a text is read, and the trade ratio two detectors are compared by. Read once, here,
from ``configs/safety.yaml`` (what each one does and why: the comments there). ``PROBE`` (the probe's
recipe) is read by ``utils.safety_screen``, beside the screen whose hidden states it reads."""
from __future__ import annotations

from ..io import read_yaml
from ..paths import CONFIGS_DIR, shown
from ..safety_screen import PROBE  # noqa: F401  (re-exported: one module names every setting)

CONFIG = CONFIGS_DIR / "safety.yaml"
_SETTINGS = read_yaml(CONFIG, "the safety settings (the word list; the classifiers' budgets, grids and sizes)")


def _value(section: str, key: str, kind: type, many: bool = False):
    """``section.key`` of ``CONFIG``: a ``kind``, or with ``many`` a non-empty list of them (as a tuple).
    Anything else is refused by name: an int where a float belongs (1 for 1.0) would move the keys the
    fits are kept under."""
    part = _SETTINGS.get(section) if isinstance(_SETTINGS, dict) else None
    value = part.get(key) if isinstance(part, dict) else None
    items = value if many and isinstance(value, list) and value else [value]
    if not all(type(x) is kind for x in items):
        what = f"a non-empty list of {kind.__name__}s" if many else f"a {kind.__name__}"
        raise ValueError(f"{shown(CONFIG)}: {section}.{key} should be {what}; got {value!r}")
    return tuple(value) if many else value


MAX_FP_CV = _value("budget", "max_fp_cv", float)
BUDGETS = _value("budget", "budgets", float, many=True)
NESTED_FOLDS = _value("budget", "nested_folds", int)
HI_GRID = _value("rule", "hi_grid", float, many=True)
LO_GRID = _value("rule", "lo_grid", float, many=True)
SCREEN_GRID = _value("rule", "screen_grid", float, many=True)
CHUNK_CHARS = _value("reading", "chunk_chars", int)
MAX_SCREENED_PIECES = _value("reading", "max_screened_pieces", int)
LANGUAGE_DOUBT = _value("reading", "language_doubt", float)
LANGUAGE_CHARS = _value("reading", "language_chars", int)
TRADE_RATIO = _value("comparing", "trade_ratio", int)
