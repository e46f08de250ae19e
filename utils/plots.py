"""Figures drawn from the JSON the pipeline stages write (shown inline and saved when given a path)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # no screen on servers and in papermill
import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402

from .pareto import is_judged, pareto_front, score_of  # noqa: E402
from .runinfo import base_precision, method_text  # noqa: E402


def plot_length_distribution(splits: Mapping[str, Sequence], path: Path | None = None):
    """Histogram of words per user and per assistant turn, one colour per split."""
    sns.set_theme(style="whitegrid")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharey=False)
    for ax, role in zip(axes, ("user", "assistant")):
        for split, convs in splits.items():
            words = [len(m["content"].split()) for c in convs for m in c.messages if m["role"] == role]
            if words:
                sns.histplot(words, ax=ax, label=f"{split} (n={len(words)})", element="step", fill=False,
                             stat="density", common_norm=False, log_scale=(True, False), bins=30)
        ax.set_title(f"{role} turns")
        ax.set_xlabel("words (log scale)")
        ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_loss_curves(run: Mapping, path: Path | None = None):
    """Training and validation loss against the optimizer step, from a ``run.json``."""
    sns.set_theme(style="whitegrid")
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    for split, style in (("train", "-"), ("validation", "o-")):
        points = run["loss_history"][split]
        if points:
            ax.plot([p["step"] for p in points], [p["loss"] for p in points], style, label=split)

    title = f"{run['model']}: {method_text(run)}\n({base_precision(run)} base weights)"
    if run.get("random_init"):
        title += " - random weights"
    ax.set(title=title, xlabel="optimizer step", ylabel="loss (assistant tokens)")
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_dpo(run: Mapping, path: Path | None = None):
    """A DPO run (``utils.dpo``): its loss, and the reward margin (chosen minus rejected) of the
    training batches, against the optimizer step."""
    sns.set_theme(style="whitegrid")
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.3))
    loss = run["loss_history"]["train"]
    left.plot([p["step"] for p in loss], [p["loss"] for p in loss], "o-")
    left.axhline(0.6931, ls="--", c="grey", lw=1)  # log 2: the DPO loss where policy = reference
    left.set(title="DPO loss (dashed: log 2, the start)", xlabel="optimizer step", ylabel="loss")
    rewards = [r for r in run.get("reward_history", []) if r.get("margin") is not None]
    right.plot([r["step"] for r in rewards], [r["margin"] for r in rewards], "o-", c="tab:green")
    right.axhline(0, ls="--", c="grey", lw=1)
    right.set(title="reward margin, chosen - rejected", xlabel="optimizer step", ylabel="beta x log-ratio")
    fig.suptitle(f"{run['model']}: DPO on {run['preference_pairs']['train']} pairs"
                 + (" - random weights" if run.get("random_init") else ""))
    fig.tight_layout()
    return _save(fig, path)


def plot_judge_pairs(verdicts: Sequence[Mapping], path: Path | None = None):
    """The judge's two readings of each candidate pair (``utils.preferences``): the probability that the
    first candidate is better when shown first (x) and when shown second (y). A pair is kept when both
    are on the same side of 0.5 (lower left or upper right); elsewhere the judge follows the position."""
    sns.set_theme(style="whitegrid")
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    for kept, colour, label in ((True, "tab:green", "kept: both orders agree"),
                                (False, "tab:grey", "left out: the orders disagree")):
        pts = [v for v in verdicts if v["kept"] == kept]
        ax.scatter([v["p_first_shown_first"] for v in pts], [v["p_first_shown_second"] for v in pts], s=14,
                   c=colour, alpha=0.7, label=f"{label} ({len(pts)})")
    ax.axvline(0.5, c="black", lw=0.8)
    ax.axhline(0.5, c="black", lw=0.8)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="P(first better), first shown first",
           ylabel="P(first better), first shown second", title="The judge on two samples per prompt")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------- evaluation and benchmark figures

QUALITY = ("overall", "relevance", "coherence", "words")


def plot_quality(evaluation: Mapping, path: Path | None = None):
    """Mean score per model variant with its 95% bootstrap interval, one panel per metric."""
    sns.set_theme(style="whitegrid")
    names = list(evaluation["summary"])
    fig, axes = plt.subplots(1, len(QUALITY), figsize=(4 * len(QUALITY), 0.5 * len(names) + 2), sharey=True)
    for ax, metric in zip(axes, QUALITY):
        stats = [evaluation["summary"][n][metric] for n in names]
        means = [s["mean"] or 0 for s in stats]
        err = [
            [(s["mean"] or 0) - (s["low"] or 0) for s in stats],
            [(s["high"] or 0) - (s["mean"] or 0) for s in stats],
        ]
        ax.barh(names, means, xerr=err, color=sns.color_palette("deep", len(names)), capsize=3)
        ax.set_title(f"{metric} (n={stats[0]['n']})")
        if metric in ("overall", "coherence", "relevance"):
            ax.set_xlim(1, 5)
    fig.suptitle("Response quality (judge grades 1-5, length in words), mean with 95% bootstrap interval")
    fig.tight_layout()
    return _save(fig, path)


def plot_categories(evaluation: Mapping, metric: str = "overall", path: Path | None = None):
    """One metric per category and model variant, mean with its 95% bootstrap interval."""
    import pandas as pd

    sns.set_theme(style="whitegrid")
    rows = [
        {"model": name, "category": cat, "mean": s[metric]["mean"], "low": s[metric]["low"], "high": s[metric]["high"]}
        for name, cats in evaluation["by_category"].items()
        for cat, s in cats.items()
        if s[metric]["mean"] is not None
    ]
    df = pd.DataFrame(rows)
    cats, names = list(dict.fromkeys(df["category"])), list(dict.fromkeys(df["model"]))
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(cats) * len(names) + 1.5))
    height = 0.8 / len(names)
    for j, name in enumerate(names):
        sub = df[df["model"] == name].set_index("category").reindex(cats)
        ys = [i + j * height for i in range(len(cats))]
        ax.barh(ys, sub["mean"], height=height, label=name,
                xerr=[sub["mean"] - sub["low"], sub["high"] - sub["mean"]], capsize=2)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(cats))], cats)
    ax.set_xlim(1, 5)
    ax.set_xlabel(f"{metric} (judge, 1-5)")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"{metric} by category, mean with 95% bootstrap interval")
    fig.tight_layout()
    return _save(fig, path)


def plot_latency(bench: Mapping, path: Path | None = None):
    """Latency distribution per model and variant (batch-1 rows; random-weight rows labelled)."""
    import pandas as pd

    sns.set_theme(style="whitegrid")
    rows = []
    for r in bench["rows"]:
        label = f"{r['model']}{' (random weights)' if r['random_init'] else ''} · {r['variant']}"
        rows += [{"variant": label, "latency (s)": x} for x in r["latencies_s"]]
    df = pd.DataFrame(rows)
    fig, ax = plt.subplots(figsize=(9, 0.35 * df["variant"].nunique() + 1.5))
    sns.stripplot(df, x="latency (s)", y="variant", ax=ax, size=5, jitter=0.15)
    sns.pointplot(df, x="latency (s)", y="variant", ax=ax, estimator="median", errorbar=None, color="black",
                  markers="|", linestyles="none")
    ax.set_title(f"Latency of {bench['method']['new_tokens']} new tokens (dots: runs, bar: median)")
    ax.set_xscale("log")
    fig.tight_layout()
    return _save(fig, path)


def plot_decode(report: Mapping, path: Path | None = None):
    """Decode tokens/s per model, variant and engine (the decode benchmark of ``utils.decode``)."""
    import pandas as pd

    sns.set_theme(style="whitegrid")
    df = pd.DataFrame(
        [
            {
                "model · variant": f"{r['model']} · {r['variant']}",
                "engine · form": f"{r['engine']} · {r['form']}",
                "decode tokens/s": r["decode_tokens_per_s"],
            }
            for r in report["rows"]
        ]
    )
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(df) + 1.5))
    sns.barplot(df, x="decode tokens/s", y="model · variant", hue="engine · form", ax=ax)
    ax.set_title(f"Greedy decode, batch 1, {report['method']['new_tokens']} tokens ({report['machine']['cpu']})")
    fig.tight_layout()
    return _save(fig, path)


def plot_parameters(trainable: Mapping[str, Mapping], path: Path | None = None):
    """Trainable vs total parameters per model, log scale."""
    sns.set_theme(style="whitegrid")
    names = list(trainable)
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(names) + 1.5))
    y = range(len(names))
    ax.barh([i + 0.2 for i in y], [trainable[n]["total_params"] for n in names], height=0.4, label="total")
    ax.barh(
        [i - 0.2 for i in y], [trainable[n]["trainable_params"] for n in names], height=0.4, label="trainable (LoRA)"
    )
    ax.set_yticks(list(y), names)
    ax.set_xscale("log")
    for i, n in enumerate(names):
        ax.text(trainable[n]["trainable_params"], i - 0.2, f" {trainable[n]['trainable_percent']:.2f}%", va="center")
    ax.set_xlabel("parameters (log scale)")
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_memory(bench: Mapping, path: Path | None = None):
    """Model memory footprint per variant and the peak resident memory of each model's process."""
    import pandas as pd

    sns.set_theme(style="whitegrid")
    df = pd.DataFrame([{"model": r["model"] + (" (random)" if r["random_init"] else ""), "variant": r["variant"],
                        "MB": r["memory_footprint_mb"]} for r in bench["rows"] if r["batch"] == 1])
    fig, ax = plt.subplots(figsize=(9, 3.5))
    sns.barplot(df, x="model", y="MB", hue="variant", ax=ax)
    ax.set_yscale("log")
    ax.set_title("Model memory footprint (log scale)")
    fig.tight_layout()
    return _save(fig, path)


def plot_pareto(sweep: Mapping, x: str, xlabel: str, path: Path | None = None, log_x: bool = False):
    """Quality (the judge's overall grade with its 95% interval, or minus the held-out loss without a
    judge) of every sweep trial against a cost; the trials on the Pareto front of this cost are
    joined and filled, the others hollow."""
    sns.set_theme(style="whitegrid")
    trials = [t for t in sweep["trials"] if score_of(t) is not None and t.get(x) is not None]
    judged = bool(trials) and all(is_judged(t) for t in trials)
    fig, ax = plt.subplots(figsize=(8, 5))
    ranked = [t.get("ranked", True) for t in trials]
    front = [on and r for on, r in zip(pareto_front([(t[x], score_of(t)) if r else (float("inf"), float("-inf"))
                                                     for t, r in zip(trials, ranked)]), ranked)]
    colours = dict(zip(sorted({t["method"] for t in trials}), sns.color_palette("tab10")))
    for t, on in zip(trials, front):
        y = score_of(t)
        err = [[y - t["quality"]["low"]], [t["quality"]["high"] - y]] if judged else None
        ax.errorbar(t[x], y, yerr=err, fmt="o", color=colours[t["method"]], mfc=colours[t["method"]] if on else "white",
                    capsize=3, ms=7, label=t["method"])
        label = t["key"] if t.get("ranked", True) else f"{t['key']} (not ranked)"
        ax.annotate(label, (t[x], y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    on_front = sorted((t[x], score_of(t)) for t, on in zip(trials, front) if on)
    if on_front:
        ax.step([p[0] for p in on_front], [p[1] for p in on_front], where="post", color="grey", lw=1, ls="--",
                label="Pareto front")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="best")
    if log_x:
        ax.set_xscale("log")
    ylabel = "judge overall grade (1-5), 95% CI" if judged else "minus held-out loss (higher is better)"
    ax.set(xlabel=xlabel, ylabel=ylabel,
           title=f"{sweep['model']}: quality vs {xlabel.split(' (')[0]} (filled: on the Pareto front)")
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path):
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig


def show(*figures) -> None:
    """Display figures inline in a notebook whatever the matplotlib backend (this module uses Agg),
    as PNG images; also after ``_save`` closed them."""
    import io

    from IPython.display import Image, display

    for fig in figures:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        display(Image(data=buf.getvalue(), format="png"))
