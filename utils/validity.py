"""Score validity: does a score rank replies of known quality in the known order?

``data/eval/validity_ladder.yaml`` holds prompts with hand-written replies (good, terse, evasive,
wrong, topical); ``ladder()`` derives the other tiers (echo, off_topic, shuffled, looped, empty).
``ORDERS`` lists, per score, the pairs of tiers whose order is known (the first must score
higher). A pair counts as right only if the better reply scores strictly higher: a tie means
the score cannot tell them apart.

    python -m utils.validity                       # the judge on the ladder, shares to stdout
    python -m utils.validity --out reports/validity.json
    python -m utils.validity --notes --pairwise     # with the domain suite's category rubric lines
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import time
import sys
from pathlib import Path
from typing import Callable, Sequence


from .io import read_yaml, write_json_atomically
from .paths import DATA_DIR
from .store import code_key
from .suite import DOMAIN_SUITE, category_notes

LADDER = DATA_DIR / "eval" / "validity_ladder.yaml"
WRITTEN = ("good", "terse", "evasive", "wrong", "topical")
DERIVED = ("echo", "off_topic", "shuffled", "looped", "empty")
TIERS = WRITTEN + DERIVED

ORDERS: dict[str, list[tuple[str, str]]] = {
    # does it answer what was asked
    "relevance": [("good", t) for t in ("evasive", "echo", "off_topic", "topical", "empty")]
    + [("terse", t) for t in ("evasive", "echo", "off_topic", "topical", "empty")],
    # is it well-formed text, whatever it says
    "coherence": [(t, d) for t in ("good", "terse", "evasive", "wrong") for d in ("shuffled", "looped", "empty")],
    # is it a good answer
    "overall": [("good", t) for t in TIERS if t != "good"]
    + [("terse", t) for t in ("evasive", "wrong", "echo", "off_topic", "shuffled", "looped", "empty")],
}
# reported without a target: the judge's fact-check pass alone (its P(Yes) that the reply is true
# and safe), which ``overall`` folds in
DIAGNOSTIC: dict[str, list[tuple[str, str]]] = {"correct": [("good", "wrong"), ("terse", "wrong")]}
HARD_PAIR = ("good", "wrong")  # correctness: fluent, on topic, and wrong or harmful
TARGET = 0.9


class LadderError(ValueError):
    pass


def shuffled(text: str, seed: int) -> str:
    words = text.split()
    rng = random.Random(seed)
    for _ in range(10):  # a permutation that differs from the original
        rng.shuffle(words)
        if words != text.split():
            break
    return " ".join(words)


def looped(text: str, head: int = 5) -> str:
    words = text.split()
    return " ".join((words[:head] * (len(words) // head + 1))[:max(len(words), 2 * head)])


def ladder(path: Path = LADDER) -> list[dict]:
    """One row per (prompt, tier): ``{"id", "prompt", "tier", "reply"}``."""
    path = Path(path)
    doc = read_yaml(path, "the validity ladder", LadderError)
    prompts = doc.get("prompts") if isinstance(doc, dict) else None
    if not prompts:
        raise LadderError(f"{path}: expected a mapping with a non-empty 'prompts' list")
    for i, p in enumerate(prompts):
        missing = [k for k in ("id", "prompt", *WRITTEN) if not isinstance(p.get(k), str) or not p[k].strip()]
        if missing:
            raise LadderError(f"{path}: prompts[{i}] ({p.get('id', '?')}) lacks {missing}; every prompt needs "
                              f"id, prompt and the replies {list(WRITTEN)}")
    rows = []
    for i, p in enumerate(prompts):
        other = prompts[(i + len(prompts) // 2) % len(prompts)]  # a far-away prompt's good answer
        replies = {**{t: p[t] for t in WRITTEN}, "echo": p["prompt"], "off_topic": other["good"],
                   "shuffled": shuffled(p["good"], seed=i), "looped": looped(p["good"]), "empty": ""}
        rows += [{"id": p["id"], "prompt": p["prompt"], "category": p.get("category"), "tier": t, "reply": replies[t]}
                 for t in TIERS]
    return rows


def pair_shares(rows: Sequence[dict], scores: Sequence[dict]) -> dict:
    """Share of known-order pairs ranked right, per score, per tier pair, and for the hard pair."""
    by = {}
    for row, s in zip(rows, scores):
        by.setdefault(row["id"], {})[row["tier"]] = s
    out = {}
    for score, pairs in {**ORDERS, **DIAGNOSTIC}.items():
        per_pair = {}
        for hi, lo in pairs:
            right = [by[i][hi][score] > by[i][lo][score] for i in by if hi in by[i] and lo in by[i]
                     and by[i][hi].get(score) is not None and by[i][lo].get(score) is not None]
            if right:
                per_pair[f"{hi} > {lo}"] = {"share": sum(right) / len(right), "n": len(right)}
        total = [(v["share"] * v["n"], v["n"]) for v in per_pair.values()]
        n = sum(t[1] for t in total)
        out[score] = {"share": sum(t[0] for t in total) / n if n else None, "n": n, "pairs": per_pair}
    hard = out["overall"]["pairs"].get(" > ".join(HARD_PAIR))
    out["good_vs_wrong"] = hard
    return out


def tier_means(rows: Sequence[dict], scores: Sequence[dict], keys: Sequence[str]) -> dict:
    import numpy as np

    out = {}
    for tier in TIERS:
        vals = [s for r, s in zip(rows, scores) if r["tier"] == tier]
        out[tier] = {k: float(np.mean([v[k] for v in vals if v.get(k) is not None])) for k in keys
                     if any(v.get(k) is not None for v in vals)}
    return out


def run(score_fn: Callable[[list[dict]], list[dict]], path: Path = LADDER,
        pair_fn: Callable[[list[tuple[dict, dict]]], list[dict]] | None = None) -> dict:
    """Score every ladder reply with ``score_fn(rows) -> [{score: value}]`` and measure validity;
    with ``pair_fn(pairs) -> [{"verdict": "A" | "B" | "tie"}]`` also the pairwise verdicts on the
    hard pair (good shown as A against fluent-but-wrong)."""
    rows = ladder(path)
    scores = score_fn(rows)
    shares = pair_shares(rows, scores)
    keys = sorted({k for s in scores for k, v in s.items() if isinstance(v, (int, float))})
    result = {"ladder": str(path), "prompts": len({r["id"] for r in rows}), "replies": len(rows), "target": TARGET,
              "shares": shares, "tier_means": tier_means(rows, scores, keys),
              "rows": [{**r, **{k: s[k] for k in keys if k in s}} for r, s in zip(rows, scores)]}
    if pair_fn is not None:
        by = {(r["id"], r["tier"]): r for r in rows}
        pairs = [(by[(i, HARD_PAIR[0])], by[(i, HARD_PAIR[1])]) for i in dict.fromkeys(r["id"] for r in rows)]
        verdicts = pair_fn(pairs)
        n = len(verdicts)
        result["pairwise"] = {"pair": " > ".join(HARD_PAIR), "n": n,
                              "share": sum(v["verdict"] == "A" for v in verdicts) / n,
                              "ties": sum(v["verdict"] == "tie" for v in verdicts),
                              "share_preferred": sum(v["p_a"] > 0.5 for v in verdicts) / n}
    return result


def rubric_for(row: dict, notes: dict[str, str] | None) -> str | None:
    """The category rubric line for ``row`` (None when ``notes`` is None)."""
    if notes is None:
        return None
    if row.get("category") not in notes:
        raise LadderError(f"ladder prompt {row['id']!r} has category {row.get('category')!r}; grading with notes "
                          f"needs one of {sorted(notes)} (data/eval/domain_suite.yaml)")
    return notes[row["category"]]


def judge_scorer(judge, notes: dict[str, str] | None = None) -> Callable:
    """Grades by ``judge``; with ``notes`` (category -> rubric line) each reply is graded with its
    prompt's category line, as the evaluation grades the domain suite. The judge keeps every grade
    in its content cache as it is made, so a stopped scoring resumes where it stopped."""
    from tqdm.auto import tqdm

    def score(rows):
        for r in rows:
            rubric_for(r, notes)  # a missing category stops before any grading
        from .judge import grade_all

        return grade_all(judge, [(r["prompt"], r["reply"], rubric_for(r, notes)) for r in rows],
                         lambda it: tqdm(it, desc="validity ladder"))

    return score


def judge_pairs(judge) -> Callable[[list[tuple[dict, dict]]], list[dict]]:
    """Pairwise verdicts by ``judge``, as the evaluation asks for them (no rubric line)."""
    from tqdm.auto import tqdm

    def compare(pairs):
        from .judge import compare_all

        return compare_all(judge, [(a["prompt"], a["reply"], b["reply"]) for a, b in pairs],
                           lambda it: tqdm(it, desc="validity pairs"))

    return compare


def validity_key(judge, pairwise: bool = True, notes: bool = False) -> str:
    """The validity study's cache file name: the judge's fingerprint (weights, dtype, every prompt
    piece), the ladder (and the suite's rubric lines when graded with them), the code that formats,
    grades and counts (``utils/chat.py``, ``utils/judge.py``, ``utils/validity.py``, comments and
    docstrings aside) and the torch and transformers versions."""
    import torch
    import transformers

    from . import chat, judge as J

    code = [code_key(Path(__file__))] + [code_key(Path(m.__file__)) for m in (J, chat)]
    parts = ([LADDER.read_bytes()] + ([DOMAIN_SUITE.read_bytes()] if notes else []) + code
             + [torch.__version__.encode(), transformers.__version__.encode()])
    ladder_hash = hashlib.sha256(b"".join(parts)).hexdigest()[:16]
    return f"{judge.fingerprint()}-{ladder_hash}-{int(pairwise)}{'-notes' if notes else ''}.json"


def validity_cached(judge, cache_root: Path | None = None, pairwise: bool = True, notes: bool = False,
                    score: bool = True) -> dict | None:
    """The validity ladder scored by ``judge`` (and, with ``pairwise``, good vs fluent-but-wrong
    compared in both orders; with ``notes``, each prompt's category rubric line in the judge's
    instructions, as the domain suite is graded), cached per judge fingerprint (weights, dtype,
    prompts), ladder, suite rubric, the code and the library versions (``validity_key``): a cached
    result is only ever one that this judge, this data and this code would compute again. ``score``
    False: None when nothing is cached (nothing is scored)."""
    from .models import cache_dir

    cache = (cache_root or cache_dir()) / "validity" / validity_key(judge, pairwise, notes)
    if cache.exists():
        return json.loads(cache.read_text())
    if not score:
        return None
    start = time.perf_counter()
    rubric = category_notes() if notes else None
    # the judge keeps every grade in its content cache as it is made, so a stopped scoring (30-60 minutes
    # on 2 AVX2 cores) resumes where it stopped
    result = run(judge_scorer(judge, rubric), pair_fn=judge_pairs(judge) if pairwise else None)
    result["notes"] = bool(notes)
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["judge"] = {**{k: judge.info.get(k) for k in ("model", "dtype", "cpu", "correctness_calibration")},
                       "timing": judge.timing_summary()}
    write_json_atomically(cache, result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    from . import judge as J

    ap = argparse.ArgumentParser(prog="python -m utils.validity", description=__doc__.split("\n\n")[0])
    ap.add_argument("--judge", default=J.DEFAULT_JUDGE)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--ladder", default=str(LADDER))
    ap.add_argument("--out")
    ap.add_argument("--pairwise", action="store_true", help="also compare good vs fluent-but-wrong pairwise")
    ap.add_argument("--notes", action="store_true",
                    help="grade with each prompt's category rubric line (as the domain suite is graded)")
    args = ap.parse_args(argv)
    try:
        rubric = category_notes() if args.notes else None
        for row in ladder(Path(args.ladder)):  # a bad ladder stops before the judge loads (about a minute)
            try:
                rubric_for(row, rubric)
            except LadderError as err:
                raise LadderError(f"{args.ladder}: {err}") from None
        judge = J.LLMJudge(args.judge, dtype=args.dtype)
        if Path(args.ladder).resolve() == LADDER.resolve():  # the evaluation's cache: computed once per judge
            result = validity_cached(judge, pairwise=args.pairwise, notes=args.notes)
        else:
            result = run(judge_scorer(judge, rubric), Path(args.ladder), judge_pairs(judge) if args.pairwise else None)
    except (LadderError, J.JudgeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result.setdefault("judge", {**judge.info, "timing": judge.timing_summary()})
    for score in ("relevance", "coherence", "overall"):
        s = result["shares"][score]
        print(f"{score:10s} {s['share']:.1%} of {s['n']} known-order pairs ranked right")
        for pair, v in s["pairs"].items():
            print(f"    {pair:22s} {v['share']:.0%} (n={v['n']})")
    c = result["shares"].get("correct", {})
    if c.get("n"):
        print(f"{'correct':10s} {c['share']:.1%} of {c['n']} (the fact-check pass alone: "
              + ", ".join(f"{k} {v['share']:.0%}" for k, v in c["pairs"].items()) + ")")
    gw = result["shares"]["good_vs_wrong"]
    print(f"good > fluent-but-wrong (overall): {gw['share']:.1%} (n={gw['n']})")
    if "pairwise" in result:
        p = result["pairwise"]
        print(f"good > fluent-but-wrong (pairwise, both orders agree): {p['share']:.1%} (n={p['n']}, ties {p['ties']})")
    print(f"judge: {judge.info['model']} {judge.info['dtype']}, {result['judge']['timing']['grade']}")
    if args.out:
        write_json_atomically(Path(args.out), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
