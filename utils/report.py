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
from .io import write_json_atomically, write_text_atomically


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
    out: dict = {"schema": 1, "run_id": run_dir.name, "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "pipeline": {"plan": state.get("plan"), "steps": state.get("steps")}}

    if bench:
        latency = {}
        for r in bench["rows"]:
            if r["batch"] != 1:
                continue
            key = f"{r['model']}{' (random weights)' if r['random_init'] else ''} · {r['variant']}"
            ci = _ci(r["latencies_s"])
            latency[key] = {"model": r["model"], "variant": r["variant"], "random_init": r["random_init"],
                            "avg_s": r["latency_mean_s"], "median_s": r["latency_median_s"], "p95_s": r["latency_p95_s"],
                            "ci_low": ci["low"], "ci_high": ci["high"], "n": r["n"], "ttft_s": r["ttft_mean_s"],
                            "decode_tokens_per_s": r["decode_tokens_per_s"], "roofline_fraction": r["roofline_fraction"],
                            "memory_footprint_mb": r["memory_footprint_mb"], "label": r.get("label")}
        out["latency"] = latency
        out["latency_batched"] = [r for r in bench["rows"] if r["batch"] != 1]
        out["benchmark_checks"] = bench["checks"]
        out["original_pair"] = {"ratio_tinyllama_over_gpt2": bench["original_pair_ratio_tinyllama_over_gpt2"],
                                "label": "random weights: speed and size only"}
        out["benchmark_method"] = bench["method"]
        out["machine"] = bench["machine"]

    if evaluation:
        response = {}
        for name, s in evaluation["summary"].items():
            response[name] = {"avg_len_words": s["words"], "coherence": s["coherence"], "relevance": s["relevance"],
                              "rouge_l": s["rouge_l"], "chrf": s["chrf"], "similarity": s["similarity"],
                              "fluency": s["fluency"], "non_repetition": s["non_repetition"], "rubric": s["rubric"],
                              "new_tokens": s["new_tokens"], "latency_amortized_s": s["latency_s"]}
        out["response"] = response
        out["heldout"] = {n: v["heldout"] for n, v in evaluation["variants"].items()}
        out["win_rates"] = evaluation["win_rates"]
        out["evaluation_parameters"] = evaluation["config"]
        out["judge_model"] = evaluation["judge_model"]

    out["human_ratings"] = human_agreement(ratings_db)

    out["trainable_params"] = {m: {"trainable": r["trainable_params"], "total": r["total_params"],
                                   "percent": r["trainable_percent"], "load_in_8bit": r["load_in_8bit"],
                                   "random_init": r["random_init"], "train_tokens_per_s": r["train_tokens_per_s"],
                                   "best_eval_loss": r["best_eval_loss"], "global_step": r["global_step"]}
                               for m, r in runs.items()}
    versions = next(iter(runs.values()), {}).get("versions")
    if versions is None:
        from .training import _versions

        versions = _versions()
    out["versions"] = versions
    return out


# --------------------------------------------------------------------------- HTML


def _fmt(x, digits=3):
    if x is None:
        return "–"
    if isinstance(x, (int, np.integer)):
        return f"{x:,}"
    return f"{x:.{digits}f}"


def _interval(s: dict, digits=2) -> str:
    if not s or s.get("mean") is None:
        return "–"
    return f"{s['mean']:.{digits}f} <span class=ci>[{s['low']:.{digits}f}, {s['high']:.{digits}f}]</span>"


def _table(header, rows) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(path: Path, alt: str) -> str:
    if not path.exists():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def _markdown(text: str) -> str:
    import mistune

    return mistune.html(text)


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}.ci{color:#777;font-size:12px}img{max-width:100%}figure{margin:1em 0}figcaption{color:#666;font-size:13px}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.5em 1em}pre{white-space:pre-wrap}"""


def render_html(m: dict, run_dir: Path) -> str:
    run_dir = Path(run_dir)
    figs = run_dir / "figures"
    parts = [f"<h1>LoRA comparison report · run {html.escape(m['run_id'])}</h1>",
             "<p class=note>Research output, not a substitute for professional advice. Numbers below were measured in "
             "this run on the machine described at the end.</p>"]

    if "latency" in m:
        rows = [[html.escape(k), _fmt(v["avg_s"]), _fmt(v["median_s"]), _fmt(v["p95_s"]),
                 f"<span class=ci>[{_fmt(v['ci_low'])}, {_fmt(v['ci_high'])}]</span>", v["n"], _fmt(v["ttft_s"]),
                 _fmt(v["decode_tokens_per_s"], 1), f"{100 * v['roofline_fraction']:.0f}%"]
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
            rows = [[html.escape(k), f"{100 * c['merged_roofline_fraction']:.0f}%",
                     f"{100 * (c['merged_vs_base_latency'] - 1):+.1f}%", f"{100 * c['unmerged_overhead']:+.1f}%",
                     "yes" if c["target_merged_at_least_half_of_bound"] else "no",
                     "yes" if c["target_merged_within_5pct_of_base"] else "no"]
                    for k, c in m["benchmark_checks"].items()]
            parts += ["<h3>Targets</h3>", _table(["model", "merged LoRA: share of roofline", "merged vs base latency",
                                                  "unmerged LoRA overhead", "merged >= 50% of bound", "merged within 5% of base"], rows)]
        if m.get("latency_batched"):
            rows = [[f"{r['model']} · {r['variant']}", r["batch"], _fmt(r["latency_mean_s"]),
                     _fmt(r["decode_tokens_per_s"], 1), f"{100 * r['roofline_fraction']:.0f}%"] for r in m["latency_batched"]]
            parts += ["<h3>Batched generation</h3>", _table(["model · variant", "batch", "Avg (s)", "decode tok/s (all rows)",
                                                             "of roofline (per step)"], rows)]
        parts.append(_img(figs / "latency.png", "Latency per model and variant"))

    if "response" in m:
        rows = [[html.escape(n), _interval(r["avg_len_words"], 1), _interval(r["coherence"]), _interval(r["relevance"]),
                 r["coherence"]["n"]] for n, r in m["response"].items()]
        parts += ["<h2>Response characteristics</h2>",
                  _table(["model", "Avg Len (words)", "Coherence /5", "Relevance /5", "n"], rows),
                  "<h3>Against the reference answer</h3>",
                  _table(["model", "ROUGE-L", "chrF", "embedding similarity", "held-out loss", "perplexity"],
                         [[html.escape(n), _interval(r["rouge_l"], 3), _interval(r["chrf"], 1), _interval(r["similarity"], 3),
                           _fmt(m["heldout"][n]["loss"]), _fmt(m["heldout"][n]["perplexity"], 1)]
                          for n, r in m["response"].items()]),
                  "<h3>Coherence, part by part</h3>",
                  _table(["model", "fluency", "non-repetition", "rubric (judge)"],
                         [[html.escape(n), _interval(r["fluency"]), _interval(r["non_repetition"]), _interval(r["rubric"])]
                          for n, r in m["response"].items()]),
                  _img(figs / "quality.png", "Quality with 95% intervals")]
        if m.get("win_rates"):
            rows = []
            for pair, by_metric in m["win_rates"].items():
                for metric, w in by_metric.items():
                    rows.append([html.escape(pair), metric, f"{w['win_rate']:.2f} <span class=ci>[{w['low']:.2f}, {w['high']:.2f}]</span>",
                                 f"{w['wins']}/{w['ties']}/{w['losses']}", w["n"]])
            parts += ["<h3>Paired win rates</h3><p>Share of prompts where the first model scores higher (ties count half), "
                      "95% bootstrap interval.</p>", _table(["pair", "metric", "win rate", "wins/ties/losses", "n"], rows)]

    if m.get("trainable_params"):
        rows = [[html.escape(k), _fmt(v["trainable"]), _fmt(v["total"]), f"{v['percent']:.3f}%",
                 "yes" if v["load_in_8bit"] else "no", _fmt(v["train_tokens_per_s"], 1), _fmt(v["best_eval_loss"])]
                for k, v in m["trainable_params"].items()]
        parts += ["<h2>Trainable parameters</h2>",
                  _table(["model", "trainable", "total", "%", "8-bit", "train tok/s", "best val loss"], rows),
                  _img(figs / "parameters.png", "Trainable vs total parameters (log scale)")]
        for name in m["trainable_params"]:
            parts.append(_img(figs / f"loss_curves-{name}.png", f"Loss curves: {name}"))
    parts.append(_img(figs / "memory.png", "Memory footprint"))

    samples = run_dir / "samples.jsonl"
    if samples.exists():
        rows = [json.loads(line) for line in samples.read_text().splitlines()[:8]]
        names = [k for k in rows[0] if k not in ("id", "prompt", "reference", "crisis_flag")] if rows else []
        parts += ["<h2>Sample outputs</h2>", _table(["prompt", "reference"] + names,
                  [[html.escape(r["prompt"]), html.escape(r["reference"])] + [html.escape(r[n]) for n in names] for r in rows])]

    if m.get("human_ratings"):
        h = m["human_ratings"]
        rows = [[k, "–" if a["spearman"] is None else f"{a['spearman']:.2f}", a["n"]] for k, a in h["agreement"].items()]
        parts += [f"<h2>Agreement with human ratings</h2><p>{h['votes']} blind-arena votes in the dashboard's "
                  "rating store; Spearman correlation between the automatic 1-5 scores and the human ones.</p>",
                  _table(["score", "Spearman", "n"], rows)]

    cards = sorted((run_dir / "cards").glob("*.md")) if (run_dir / "cards").exists() else []
    if cards:
        parts.append("<h2>Data and model cards</h2>")
        parts += [_markdown(c.read_text().split("![length", 1)[0]) for c in cards]
    parts.append("<h2>How the scores are computed</h2><pre>" + html.escape(M.__doc__) + "</pre>")
    if m.get("machine"):
        parts.append("<h2>Machine and versions</h2>" + _table(["", ""], [[k, html.escape(str(v))] for k, v in
                                                                         {**m["machine"], **m.get("versions", {})}.items()]))
    return f"<!doctype html><html><head><meta charset=utf-8><title>LoRA comparison {html.escape(m['run_id'])}</title><style>{CSS}</style></head><body>{''.join(parts)}</body></html>"


def build_report(run_dir: Path, ratings_db: Path | None = None) -> Path:
    """Write ``metrics.json`` and ``report.html`` into ``run_dir``; return the HTML path."""
    from . import reporting

    run_dir = Path(run_dir)
    m = collect_metrics(run_dir, ratings_db)
    if m["trainable_params"]:
        reporting.plot_parameters({k: {"trainable_params": v["trainable"], "total_params": v["total"],
                                       "trainable_percent": v["percent"]} for k, v in m["trainable_params"].items()},
                                  run_dir / "figures" / "parameters.png")
    write_json_atomically(run_dir / "metrics.json", m)
    write_text_atomically(run_dir / "report.html", render_html(m, run_dir))
    return run_dir / "report.html"
