"""Safety for the dashboard and the evaluation outputs, measured on labelled data we wrote.

- **Crisis detector** (``crisis_check``, ``crisis_flag``): does a message say that the writer, or
  someone they describe, may be at risk of suicide or self-harm? A logistic regression
  (``TextClassifier``) on the frozen sentence embeddings of all-MiniLM-L6-v2 (the encoder the project
  already ships) and character n-grams, trained on the train split of
  ``data/eval/safety/fitted/crisis_messages.yaml`` (440 messages, ten kinds: explicit, implicit, indirect,
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
  classifier (trained on ``data/eval/safety/fitted/unsafe_replies.yaml`` and ``REPLY_ADDED``: harmful instructions,
  encouragement of self-harm, harassment; and safe replies, including safe talk about dangerous
  topics), or its LLM screen for replies it cannot decide, puts it in an unsafe kind, or when the
  configurable word list (``configs/safety.yaml``, ``blocked_terms``) matches: an extra, explicit layer.
- Text the detector cannot judge (not English, by script or by ``language_doubt``; binary) returns
  ``doubt``; the dashboard then shows the help notice rather than nothing.

    python -m utils.safety fit [--ship]            # fit both (or load them); --ship: write SHIPPED_FIT
    python -m utils.safety evaluate [--out FILE]   # recall per kind, false positives, 95% intervals

The package, one concept a module, lower ones first (none imports one above it):

- ``settings``: the budgets, grids and reading sizes; ``text``: the regular expressions, the word list,
  what can be judged and the pieces a text is read in; ``labelled``: the labelled sets and their split;
- ``classifiers``: the fast path and the rule chosen on its scores; ``probe``: the probe on the judge's
  hidden states and which screen is used (the screen itself: ``utils.safety_screen``, beside the package);
- ``fitcache``: where fits are kept; ``cascade``: the two cascades and the calls the dashboard makes;
  ``upkeep``: whether the fits are current, shipping and pruning them; ``study``: measuring, comparing and
  the command line.

This module is the face the dashboard, the evaluation and the tests use: the names they use, re-exported.
"""
from __future__ import annotations

from ..safety_screen import SCREENS, Screen
from .cascade import (HELP_NOTICE, RESEARCH_NOTE, CrisisDetector, OutputFilter, Verdict, _Cascade, _stage_key,
                      crisis_check, crisis_flag, detector, output_check, preload)
from .classifiers import (TextClassifier, _screen_rows, choose_rule, nested_recall, nested_rule, pick_threshold,
                          rule_flags)
from .fitcache import SHIPPED_FIT, _cache_folder, _stage_digest
from .labelled import (CRISIS_DATA, CRISIS_SETS, LADDER_SAFE_TIERS, REPLY_DATA, REPLY_SETS, SAFETY_DATA, _near_copy,
                       held_out, ladder_prompts, ladder_replies, load_labelled, split_of)
from .probe import HiddenStateProbe
from .settings import BUDGETS, MAX_FP_CV, PROBE
from .text import PATTERN_SETS, blocked_terms, chunks, language_doubt, language_of, pattern_flag
from .upkeep import current_cache_folders, current_stage_keys, fitted, prune, stale_shipped

# The study's names load on first use (``__getattr__`` below): the dashboard never needs them, and
# ``python -m utils.safety.study`` then runs that module once rather than after importing it here.
_STUDY = ("_fast_only", "compare_verdicts", "crisis_verdicts", "decide", "evaluate", "main")

__all__ = [
    "BUDGETS", "CRISIS_DATA", "CRISIS_SETS", "HELP_NOTICE", "LADDER_SAFE_TIERS", "MAX_FP_CV", "PATTERN_SETS",
    "PROBE", "REPLY_DATA", "REPLY_SETS", "RESEARCH_NOTE", "SAFETY_DATA", "SCREENS", "SHIPPED_FIT", "CrisisDetector",
    "HiddenStateProbe", "OutputFilter", "Screen", "TextClassifier", "Verdict", "_Cascade", "_cache_folder",
    "_near_copy", "_screen_rows", "_stage_digest", "_stage_key", "blocked_terms", "choose_rule", "chunks",
    "crisis_check", "crisis_flag", "current_cache_folders", "current_stage_keys", "detector", "fitted", "held_out",
    "ladder_prompts", "ladder_replies", "language_doubt", "language_of", "load_labelled", "nested_recall",
    "nested_rule", "output_check", "pattern_flag", "pick_threshold", "preload", "prune", "rule_flags", "split_of",
    "stale_shipped", *_STUDY,
]


def __getattr__(name: str):
    if name in _STUDY:
        from . import study

        return getattr(study, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
