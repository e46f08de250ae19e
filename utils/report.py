"""The run report: ``metrics.json`` (every number of the tables, with n and intervals) and one
self-contained ``report.html`` (figures embedded), built from what the notebooks wrote into
``reports/<run-id>/``: ``evaluation.json``, ``latency.json``, ``runs/<model>.json``, figures."""
from __future__ import annotations

import base64
import html
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import metrics as M
from .benchmark import share_text
from .io import write_json_atomically, write_text_atomically


RESPONSE_KEYS = (
    "overall",
    "relevance",
    "coherence",
    "distinct_2",
    "prompt_similarity",
    "rouge_l",
    "chrf",
    "similarity",
    "new_tokens",
    "judge_seconds",
)


def _load(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _ci(values) -> dict:
    return M.bootstrap_ci(values)


def human_agreement(db: Path | None) -> dict | None:
    """Votes in the dashboard's rating store and how well automatic scores agree with human ones."""
    from .ratings import DEFAULT_DB, RatingStore, agreement

    db = Path(db) if db is not None else DEFAULT_DB
    if not db.exists():
        return None
    votes = RatingStore(db).votes()
    if not votes:
        return None
    return {"database": str(db), "votes": len(votes), "agreement": agreement(votes)}


def collect_metrics(run_dir: Path, ratings_db: Path | None = None) -> dict:
    run_dir = Path(run_dir)
    evaluation = _load(run_dir / "evaluation.json")
    bench = _load(run_dir / "latency.json")
    runs = {p.stem: json.loads(p.read_text()) for p in sorted((run_dir / "runs").glob("*.json"))}
    state = _load(run_dir / "run.json") or {}
    out: dict = {
        "schema": 1,
        "run_id": run_dir.name,
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "pipeline": {"plan": state.get("plan"), "steps": state.get("steps")},
    }

    if bench:
        latency = {}
        for r in bench["rows"]:
            if r["batch"] != 1:
                continue
            key = f"{r['model']}{' (random weights)' if r['random_init'] else ''} · {r['variant']}"
            ci = _ci(r["latencies_s"])
            latency[key] = {
                "model": r["model"],
                "variant": r["variant"],
                "random_init": r["random_init"],
                "avg_s": r["latency_mean_s"],
                "median_s": r["latency_median_s"],
                "p95_s": r["latency_p95_s"],
                "ci_low": ci["low"],
                "ci_high": ci["high"],
                "n": r["n"],
                "ttft_s": r["ttft_mean_s"],
                "decode_tokens_per_s": r["decode_tokens_per_s"],
                "roofline_fraction": r["roofline_fraction"],
                "memory_footprint_mb": r["memory_footprint_mb"],
                "label": r.get("label"),
            }
        out["latency"] = latency
        out["latency_batched"] = [r for r in bench["rows"] if r["batch"] != 1]
        out["benchmark_checks"] = bench["checks"]
        out["original_pair"] = {"ratio_tinyllama_over_gpt2": bench["original_pair_ratio_tinyllama_over_gpt2"],
                                "label": "random weights: speed and size only"}
        out["benchmark_method"] = bench["method"]
        out["machine"] = bench["machine"]

    if evaluation:
        response = {}
        for name, st in evaluation["summary"].items():
            response[name] = {"avg_len_words": st["words"], **{k: st.get(k) for k in RESPONSE_KEYS},
                              "latency_amortized_s": st["latency_s"]}
        out["response"] = response
        out["by_category"] = evaluation.get("by_category")
        out["categories"] = evaluation.get("categories")
        out["heldout"] = {n: v["heldout"] for n, v in evaluation["variants"].items()}
        out["headline"] = evaluation.get("headline", [])
        out["verdicts"] = evaluation.get("verdicts", [])
        out["pairwise"] = evaluation.get("pairwise", {})
        out["grade_differences"] = evaluation.get("grade_differences", {})
        out["evaluation_parameters"] = evaluation["config"]
        out["judge_model"] = evaluation["judge_model"]
        out["judge"] = evaluation.get("judge")
        out["judge_is_compared"] = evaluation.get("judge_is_compared", [])
        for key in ("validity", "validity_notes"):
            out[key] = evaluation.get(key)
        out["dtype"] = evaluation.get("dtype")
        out["dtype_probe"] = evaluation.get("dtype_probe")

    out["timings"] = run_timings(state, evaluation)
    out["human_ratings"] = human_agreement(ratings_db)

    out["trainable_params"] = {m: {"trainable": r["trainable_params"], "total": r["total_params"],
                                   "percent": r["trainable_percent"], "load_in_8bit": r["load_in_8bit"],
                                   "random_init": r["random_init"], "train_tokens_per_s": r["train_tokens_per_s"],
                                   "best_eval_loss": r["best_eval_loss"], "global_step": r["global_step"],
                                   "dtype": r.get("dtype", "fp32")}
                               for m, r in runs.items()}
    out["preference"] = {p.stem: preference_record(json.loads(p.read_text()))
                         for p in sorted((run_dir / "preference").glob("*.json"))}
    versions = next(iter(runs.values()), {}).get("versions")
    if versions is None:
        from .system import versions as installed

        versions = installed()
    out["versions"] = versions
    return out


def preference_record(run: dict) -> dict:
    """What the report shows of a DPO run (``utils.dpo``): its pairs by source, held-out preference
    accuracy before and after, steps and time."""
    keep = ("beta", "global_step", "train_runtime_s", "held_out_before", "held_out_after", "trainable_params",
            "load_in_8bit", "dtype", "random_init")
    return {"pairs": run["preference_pairs"], **{k: run.get(k) for k in keep}}


def run_timings(state: dict, evaluation: dict | None) -> dict:
    """Where the run's time went: seconds per step (a step reused from an earlier run says so), the
    total, the CPU it ran on, and the judge's seconds per graded reply and per pairwise order (computed
    ones; ``cache`` counts the answers read from the content cache instead)."""
    from .hardware import cpu_summary

    steps = {name: {"seconds": s.get("seconds"), **({"reused_from": s["reused_from"]} if "reused_from" in s else {})}
             for name, s in (state.get("steps") or {}).items()}
    judge = (evaluation or {}).get("judge") or {}
    timing = judge.get("timing") or {}
    return {"steps": steps,
            "total_seconds": round(sum(s["seconds"] or 0 for s in steps.values() if "reused_from" not in s), 1),
            "cpu": judge.get("cpu") or cpu_summary(),
            "judge_dtype": judge.get("dtype"),
            "judge_seconds_per_reply": judge.get("seconds_per_reply"),
            "judge_seconds_per_pair_order": (timing.get("pair") or {}).get("seconds_per_call"),
            "judge_cache": timing.get("cache")}


# --------------------------------------------------------------------------- HTML


def _fmt(x, digits=3):
    if x is None:
        return "–"
    if isinstance(x, (int, np.integer)):
        return f"{x:,}"
    return f"{x:.{digits}f}"


def _grey(text: str) -> str:
    return f"<span class=ci>{text}</span>"


def _interval(s: dict, digits=2, keys=("mean", "low", "high")) -> str:
    return M.interval_text(s, digits, keys=keys, wrap=_grey)


def _table(header, rows) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(path: Path, alt: str) -> str:
    if not path.exists():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    alt = html.escape(alt)
    return f'<figure><img alt="{alt}" src="data:image/png;base64,{data}"><figcaption>{alt}</figcaption></figure>'


def _markdown(text: str) -> str:
    import mistune

    return mistune.html(text)


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}th{background:#f3f3f3}
.ci{color:#777;font-size:12px}img{max-width:100%}figure{margin:1em 0}figcaption{color:#666;font-size:13px}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.5em 1em}pre{white-space:pre-wrap}"""


def render_html(m: dict, run_dir: Path) -> str:
    run_dir = Path(run_dir)
    figs = run_dir / "figures"
    parts = [f"<h1>LoRA comparison report · run {html.escape(m['run_id'])}</h1>"]
    if m.get("headline"):
        parts.append("<p><b>" + " ".join(html.escape(s) for s in m["headline"]) + "</b></p>")
    if m.get("verdicts"):
        parts += ["<h2>Verdicts</h2><ul>" + "".join(f"<li>{html.escape(v)}</li>" for v in m["verdicts"]) + "</ul>",
                  "<p>Pairwise: the judge compares the two replies to the same prompt in both orders; a win counts "
                  "only when both orders agree (otherwise a tie). Grades: mean paired difference (first minus second), "
                  "95% bootstrap interval. \"Cannot tell apart\": the interval contains 0 (or 0.5 for win rates).</p>"]
    if m.get("judge_is_compared"):
        parts.append(
            f"<p class=note><b>Warning: the judge {html.escape(str(m['judge_model']))} is also one of the "
            f"compared models ({html.escape(', '.join(m['judge_is_compared']))}); its grades of its own replies "
            "are biased.</b></p>"
        )
    parts.append("<p class=note>Research output, not a substitute for professional advice. Numbers below were measured "
                 "in this run on the machine described at the end.</p>")

    if "latency" in m:
        rows = [[html.escape(k), _fmt(v["avg_s"]), _fmt(v["median_s"]), _fmt(v["p95_s"]),
                 _interval(v, 3, keys=(None, "ci_low", "ci_high")), v["n"], _fmt(v["ttft_s"]),
                 _fmt(v["decode_tokens_per_s"], 1), share_text(v['roofline_fraction'])]
                for k, v in m["latency"].items()]
        parts += ["<h2>Latency</h2>",
                  f"<p>Greedy generation of exactly {m['benchmark_method']['new_tokens']} new tokens at batch 1 "
                  "(min_new_tokens = max_new_tokens), after a warm-up. Interval: 95% bootstrap of the mean. "
                  "Roofline: decode steps/s as a fraction of memory bandwidth / bytes of weights.</p>",
                  _table(["model · variant", "Avg (s)", "Median (s)", "p95 (s)", "95% CI of avg", "n", "TTFT (s)",
                          "decode tok/s", "of roofline"], rows)]
        ratio = m["original_pair"]["ratio_tinyllama_over_gpt2"]
        if ratio:
            parts.append(f"<p>Original pair, re-measured here with <b>random weights (speed and size only)</b>: "
                         f"TinyLlama-1.1B is <b>{ratio:.1f}x</b> slower than GPT-2 124M per response "
                         "(the original write-up reported ~1.7x on its hardware).</p>")
        if m.get("benchmark_checks"):
            rows = [[html.escape(k), share_text(c['merged_roofline_fraction']),
                     f"{100 * (c['merged_vs_base_latency'] - 1):+.1f}%", f"{100 * c['unmerged_overhead']:+.1f}%",
                     "yes" if c["target_merged_at_least_half_of_bound"] else "no",
                     "yes" if c["target_merged_within_5pct_of_base"] else "no"]
                    for k, c in m["benchmark_checks"].items()]
            parts += [
                "<h3>Targets</h3>",
                _table(
                    [
                        "model",
                        "merged LoRA: share of roofline",
                        "merged vs base latency",
                        "unmerged LoRA overhead",
                        "merged >= 50% of bound",
                        "merged within 5% of base",
                    ],
                    rows,
                ),
            ]
        if m.get("latency_batched"):
            rows = [
                [
                    f"{r['model']} · {r['variant']}",
                    r["batch"],
                    _fmt(r["latency_mean_s"]),
                    _fmt(r["decode_tokens_per_s"], 1),
                    share_text(r["roofline_fraction"]),
                ]
                for r in m["latency_batched"]
            ]
            parts += [
                "<h3>Batched generation</h3>",
                _table(
                    ["model · variant", "batch", "Avg (s)", "decode tok/s (all rows)", "of roofline (per step)"], rows
                ),
            ]
        parts.append(_img(figs / "latency.png", "Latency per model and variant"))

    if "response" in m:
        parts += _quality_html(m, figs)

    if m.get("trainable_params"):
        rows = [[html.escape(k), _fmt(v["trainable"]), _fmt(v["total"]), f"{v['percent']:.3f}%",
                 "yes" if v["load_in_8bit"] else "no", _fmt(v["train_tokens_per_s"], 1), _fmt(v["best_eval_loss"])]
                for k, v in m["trainable_params"].items()]
        parts += ["<h2>Trainable parameters</h2>",
                  _table(["model", "trainable", "total", "%", "8-bit", "train tok/s", "best val loss"], rows),
                  _img(figs / "parameters.png", "Trainable vs total parameters (log scale)")]
        for name in m["trainable_params"]:
            parts.append(_img(figs / f"loss_curves-{name}.png", f"Loss curves: {name}"))
    if m.get("preference"):
        parts += _preference_html(m["preference"], figs)
    parts.append(_img(figs / "memory.png", "Memory footprint"))

    samples = run_dir / "samples.jsonl"
    if samples.exists():
        every = [json.loads(line) for line in samples.read_text().splitlines()]
        rows = []
        for cat in dict.fromkeys(r.get("category") for r in every):  # two per category
            rows += [r for r in every if r.get("category") == cat][:2]
        names = (
            [k for k in rows[0] if k not in ("id", "category", "prompt", "reference", "crisis_flag")] if rows else []
        )
        parts += [
            "<h2>Sample outputs</h2>",
            _table(
                ["category", "prompt", "reference"] + names,
                [
                    [
                        html.escape(str(r.get("category") or "")),
                        html.escape(r["prompt"]),
                        html.escape(r["reference"] or "–"),
                    ]
                    + [html.escape(r[n]) for n in names]
                    for r in rows
                ],
            ),
        ]

    if m.get("human_ratings"):
        h = m["human_ratings"]
        rows = [[k, "–" if a["spearman"] is None else f"{a['spearman']:.2f}",
                 M.interval_text(a, keys=(None, "low", "high")), a["n"]]
                for k, a in h["agreement"].items()]
        parts += [f"<h2>Human calibration</h2><p>{h['votes']} blind-arena votes in the dashboard's rating store; "
                  "Spearman correlation between the judge's 1-5 grades and the human 1-5 ratings of the same replies, "
                  "with a 95% bootstrap interval and n (rated replies).</p>",
                  _table(["score", "Spearman", "95% interval", "n"], rows)]

    cards = sorted((run_dir / "cards").glob("*.md")) if (run_dir / "cards").exists() else []
    if cards:
        parts.append("<h2>Data and model cards</h2>")
        parts += [_markdown(c.read_text().split("![length", 1)[0]) for c in cards]
    parts.append("<h2>How the scores are computed</h2><pre>" + html.escape(M.__doc__) + "</pre>")
    if m.get("machine"):
        parts.append(
            "<h2>Machine and versions</h2>"
            + _table(["", ""], [[k, html.escape(str(v))] for k, v in {**m["machine"], **m.get("versions", {})}.items()])
        )
    head = f"<meta charset=utf-8><title>LoRA comparison {html.escape(m['run_id'])}</title><style>{CSS}</style>"
    return f"<!doctype html><html><head>{head}</head><body>{''.join(parts)}</body></html>"


def _quality_html(m: dict, figs: Path) -> list[str]:
    judge = m.get("judge") or {}
    parts = ["<h2>Response quality</h2>"]
    if judge:
        t = judge.get("timing", {}).get("grade", {})
        parts.append(
            f"<p>Judge: <b>{html.escape(str(judge.get('model')))}</b> ({html.escape(str(judge.get('dtype')))} on "
            f"{html.escape(str(judge.get('cpu', {}).get('cpu')))}), "
            f"{_fmt(t.get('seconds_per_call'))} s of judge time per "
            f"reply over {t.get('calls')} replies. Prompts: {html.escape(json.dumps(m.get('categories')))}.</p>"
        )
    if m.get("dtype_probe"):
        probe = m["dtype_probe"]
        rates = ", ".join(f"{k} {v}" for k, v in probe.get("matmul_gflops", {}).items())
        parts.append(f"<p>Replies generated in <b>{html.escape(str(m.get('dtype')))}</b> (native bf16 on this CPU: "
                     f"{probe.get('native_bf16')}; matmul probe, GFLOP/s: {html.escape(rates)}).</p>")
    rows = [[html.escape(n), _interval(r["overall"]), _interval(r["relevance"]), _interval(r["coherence"]),
             _interval(r["avg_len_words"], 1), r["avg_len_words"]["n"]] for n, r in m["response"].items()]
    parts += [
        _table(["model", "Overall /5", "Relevance /5", "Coherence /5", "Avg Len (words)", "n"], rows),
        _img(figs / "quality.png", "Quality with 95% intervals"),
        "<h3>Cheap signals (not part of the grades)</h3>",
        _table(
            [
                "model",
                "distinct-2",
                "prompt similarity",
                "ROUGE-L",
                "chrF",
                "reference similarity",
                "held-out loss",
                "perplexity",
            ],
            [
                [
                    html.escape(n),
                    _interval(r["distinct_2"]),
                    _interval(r["prompt_similarity"]),
                    _interval(r["rouge_l"], 3),
                    _interval(r["chrf"], 1),
                    _interval(r["similarity"], 3),
                    _fmt((m["heldout"].get(n) or {}).get("loss")),
                    _fmt((m["heldout"].get(n) or {}).get("perplexity"), 1),
                ]
                for n, r in m["response"].items()
            ],
        ),
    ]
    if m.get("by_category"):
        cats = list(next(iter(m["by_category"].values())))
        rows = [[html.escape(n)] + [_interval(by[c]["overall"]) + f" <span class=ci>n={by[c]['overall']['n']}</span>"
                                    for c in cats] for n, by in m["by_category"].items()]
        parts += ["<h3>Overall grade by category</h3>", _table(["model"] + cats, rows),
                  _img(figs / "categories.png", "Overall grade by category")]
    if m.get("pairwise"):
        win = ("win_rate", "low", "high")
        rows = [[html.escape(k), _interval(w, keys=win),
                 _interval(w["length_controlled"], keys=win) if w.get("length_controlled") else "–",
                 f"{w['wins']}/{w['ties']}/{w['losses']}", w["n"]] for k, w in m["pairwise"].items() if w["n"]]
        parts += ["<h3>Pairwise judgements (both orders)</h3><p>Win rate of the first model, ties count half. "
                  "Length-controlled: the same verdicts with reply length taken out (a logistic model of the win on "
                  "the length difference, after AlpacaEval 2's length-controlled win rate; utils/metrics.py).</p>",
                  _table(["comparison", "win rate", "length-controlled", "wins/ties/losses", "n"], rows)]
    if m.get("grade_differences"):
        rows = [[html.escape(k)] + [_interval(d[g]) for g in ("overall", "relevance", "coherence", "words")]
                for k, d in m["grade_differences"].items()]
        parts += ["<h3>Paired grade differences (first minus second)</h3>",
                  _table(["comparison", "overall", "relevance", "coherence", "words"], rows)]
    return parts + _validity_html(m)


def _preference_html(preference: dict, figs: Path) -> list[str]:
    """Preference tuning: per model, how many pairs from which source, and the held-out preference
    accuracy (the verdict against the SFT adapter is in the headline and the pairwise table)."""
    from .ratings import wilson_interval

    rows = []
    for name, r in preference.items():
        after = r.get("held_out_after") or {}
        acc = "–"
        if after.get("rewards/accuracies") is not None:
            low, high = wilson_interval(round(after["rewards/accuracies"] * after["n"]), after["n"])
            acc = f"{after['rewards/accuracies']:.2f} [{low:.2f}, {high:.2f}] (n={after['n']})"
        p = r["pairs"]
        rows.append([html.escape(name), str(p["train"]), html.escape(", ".join(f"{k} {v}" for k, v in
                                                                                p["by_source"].items())),
                     str(p["held_out"]), acc, str(r["beta"]), str(r["global_step"]), _fmt(r["train_runtime_s"], 0)])
    parts = ["<h2>Preference tuning (DPO)</h2>",
             "<p>DPO (TRL) continued each SFT adapter on preference pairs (<code>utils.preferences</code>); the "
             "reference policy is the SFT model. Held-out accuracy: how often the tuned model gives the chosen reply "
             "of a held-out pair the larger reward (0 before training). Whether it answers better is the judge's "
             "verdict above (the DPO vs LoRA rows).</p>",
             _table(["model", "pairs trained", "by source", "held out", "held-out accuracy", "beta", "steps", "s"],
                    rows)]
    for name in preference:
        parts.append(_img(figs / f"dpo_curves-{name}.png", f"DPO loss and reward margin: {name}"))
    return parts


def _validity_html(m: dict) -> list[str]:
    """One "Score validity" section per way the ladder was graded (without and with rubric lines)."""
    from .evaluation import VALIDITY_VIEWS

    return [part for key, how in VALIDITY_VIEWS.items() if m.get(key) for part in _validity_section(m[key], how)]


def _validity_section(v: dict, how: str) -> list[str]:
    sh = v["shares"]
    rows = [[g, f"{100 * sh[g]['share']:.0f}%", sh[g]["n"], "yes" if sh[g]["share"] >= v["target"] else "no"]
            for g in ("relevance", "coherence", "overall")]
    gw = sh["good_vs_wrong"]
    rows.append(["overall: good vs fluent-but-wrong", f"{100 * gw['share']:.0f}%", gw["n"],
                 "yes" if gw["share"] >= v["target"] else "no"])
    if v.get("pairwise"):
        p = v["pairwise"]
        rows.append(["pairwise: good vs fluent-but-wrong (both orders agree)", f"{100 * p['share']:.0f}%", p["n"],
                     "yes" if p["share"] >= v["target"] else "no"])
    tiers = v["tier_means"]
    return [f"<h2>Score validity ({html.escape(how)})</h2>",
            f"<p>The validity ladder ({v['prompts']} prompts, {v['replies']} replies of known rank: "
            "good, terse, evasive, fluent-but-wrong, on-topic non-answer, echoed prompt, another question's "
            "answer, shuffled, looped, empty) scored by the same judge. Share of known-order pairs ranked "
            f"strictly right; target {100 * v['target']:.0f}%.</p>",
            _table(["score", "ranked right", "pairs", "meets target"], rows),
            _table(["tier", "overall", "overall (rubric alone)", "P(true and safe)", "relevance", "coherence"],
                   [[t, _fmt(s.get("overall"), 2), _fmt(s.get("overall_rubric"), 2), _fmt(s.get("correct"), 2),
                     _fmt(s.get("relevance"), 2), _fmt(s.get("coherence"), 2)] for t, s in tiers.items()])]


def build_report(run_dir: Path, ratings_db: Path | None = None) -> Path:
    """Write ``metrics.json`` and ``report.html`` into ``run_dir``; return the HTML path."""
    from . import plots

    run_dir = Path(run_dir)
    m = collect_metrics(run_dir, ratings_db)
    if m["trainable_params"]:
        plots.plot_parameters({k: {"trainable_params": v["trainable"], "total_params": v["total"],
                                       "trainable_percent": v["percent"]} for k, v in m["trainable_params"].items()},
                                  run_dir / "figures" / "parameters.png")
    write_json_atomically(run_dir / "metrics.json", m)
    write_text_atomically(run_dir / "report.html", render_html(m, run_dir))
    return run_dir / "report.html"
