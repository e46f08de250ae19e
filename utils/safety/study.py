"""The classifiers measured on data they were not fitted on (``evaluate``: the held-out split by kind,
with Wilson intervals, against the regular expressions, the word list and the fast path alone), two
crisis detectors compared message by message (``crisis_verdicts``, ``compare_verdicts``, ``decide``),
and the command line::

    python -m utils.safety fit [--ship]            # fit both (or load them); --ship: write SHIPPED_FIT
    python -m utils.safety evaluate [--out FILE]   # recall per kind, false positives, 95% intervals
    python -m utils.safety verdicts | compare | prune

(``python -m utils.safety.study ...`` is the same.)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import yaml

from ..paths import DATA_DIR, shown
from ..validity import LADDER
from .cascade import Verdict, _Cascade, crisis_check, detector, output_filter, preload
from .fitcache import SHIPPED_FIT, _write_aside
from .labelled import (CRISIS_SETS, LADDER_SAFE_TIERS, OTHER_LANGUAGES, REPLY_SETS, _same_text, held_out,
                       ladder_prompts, ladder_replies, load_labelled)
from .settings import PROBE, TRADE_RATIO
from .text import blocked_terms, pattern_flag
from .upkeep import current_cache_folders, prune, ship

_METHOD = "logistic regression on frozen all-MiniLM-L6-v2 sentence embeddings + character n-grams"


# --------------------------------------------------------------------------- measured on held-out data


def _kind_table(flags: list[bool], rows: list[dict]) -> dict:
    from ..ratings import wilson_interval

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
    from ..ratings import wilson_interval

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


def _harmless(check, rows: list[dict], what: str) -> dict:
    flags = [check(r["text"]).flag for r in rows]
    return {"what": f"flagged among {what} of {shown(LADDER)}", "flagged": sum(flags), "n": len(rows),
            "by_kind": _kind_table(flags, rows)}


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
        from ..io import write_json_atomically

        write_json_atomically(Path(out), report)
    return report


# --------------------------------------------------------------------------- comparing two detectors


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.safety")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("evaluate", help="measure the detector and the output filter on their held-out splits")
    p.add_argument("--out", help="also write the figures to this JSON file")
    p.add_argument("--crisis-data", help="measure the crisis detector on every row of this labelled file instead "
                   "(laid out like data/eval/safety/fitted/crisis_messages.yaml)")
    p.add_argument("--replies-data", help="measure the output filter on every row of this labelled file instead "
                   "(laid out like data/eval/safety/fitted/unsafe_replies.yaml)")
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
