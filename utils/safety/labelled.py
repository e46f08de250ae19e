"""The labelled sets the classifiers are fitted and measured on (``data/eval/safety/``): which files,
how they are read (``load_labelled``), their fixed train/test split (``split_of``), the refusal of
near-copies that would leak across it, the rows to measure on (``held_out``), and the validity ladder's
harmless texts, which no safety fit has seen."""
from __future__ import annotations

import hashlib
from pathlib import Path

from ..io import read_yaml
from ..paths import DATA_DIR
from ..validity import ladder

SAFETY_DATA = DATA_DIR / "eval" / "safety"
FITTED_DATA = SAFETY_DATA / "fitted"  # the sets the classifiers are fitted on (their train split)
UNSEEN_DATA = SAFETY_DATA / "unseen"  # sets only ever measured on
CRISIS_DATA = FITTED_DATA / "crisis_messages.yaml"
# Sets written later: the general ones as unseen tests, each measured as written (docs/safety.md), then added to
# the data; crisis_short and crisis_slang as training data (their headers say why). They are split by the same
# hash, so a quarter of each joins the held-out test split. The order is kept: the fits' keys hash the rows in it.
CRISIS_ADDED = tuple(FITTED_DATA / name for name in ("crisis_plans_goodbyes.yaml", "crisis_in_progress.yaml",
                                                     "crisis_self_injury.yaml", "crisis_short.yaml",
                                                     "crisis_slang.yaml", "crisis_phone_typed.yaml",
                                                     "crisis_after_ordinary_talk.yaml"))
CRISIS_SETS = (CRISIS_DATA, *CRISIS_ADDED)
REPLY_DATA = FITTED_DATA / "unsafe_replies.yaml"
# a set measured once as an unseen test, then added; short replies written as training data (its header says why);
# and replies by category of harm (weapons and explosives, poisons, self-harm, harassment, illegal drugs, minors),
# with supportive replies to people in distress and the same topics handled safely: the categories a user expects
# the filter to cover, each with examples (the filter names the category as its reason)
REPLY_ADDED = (FITTED_DATA / "unsafe_replies_petty_crime.yaml", FITTED_DATA / "unsafe_replies_short.yaml",
               FITTED_DATA / "unsafe_replies_categories.yaml")
REPLY_SETS = (REPLY_DATA, *REPLY_ADDED)


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
    from ..data import near_key

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


def _train_rows(paths, positive: str) -> list[dict]:
    return [r for r in load_labelled(paths, positive) if r["split"] == "train"]


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


OTHER_LANGUAGES = UNSEEN_DATA / "other_languages.yaml"


def _names(paths: Path | tuple[Path, ...]) -> str:
    return ", ".join(Path(p).name for p in (paths if isinstance(paths, (tuple, list)) else [paths]))
