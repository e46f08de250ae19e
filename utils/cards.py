"""Markdown cards written next to what they describe: the data card (``data/processed``) and
the model card of each training run (``models/<name>-lora/MODEL_CARD.md``)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from . import models
from .paths import adapter_root, final_adapter, from_root, shown
from .runinfo import base_precision, method_text


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_data_card(card: Mapping) -> str:
    """Markdown data card from the dict that ``utils.data.prepare`` returns."""
    counts, params = card["counts"], card["parameters"]
    splits = [s for s in counts if s != "total"]
    sources = sorted({src for s in splits for src in card["counts_by_source"][s]})
    out = [
        "# Data card",
        "",
        f"{counts['total']} conversations after cleaning, PII redaction and de-duplication, split "
        f"{' / '.join(f'{counts[s]} {s}' for s in splits)} (val_fraction={params['val_fraction']}, "
        f"test_fraction={params['test_fraction']}, seed={params['seed']}). Splits are grouped by the normalised "
        "first user turn, so no prompt appears in two splits.",
        "",
        "## Inputs",
        _table(["file", "schema", "rows", "kept"],
               [[Path(i["file"]).name, i["schema"], i["rows"], i["kept"]] for i in card["inputs"]]),
        "",
        "## Conversations per split and source",
        _table(["source"] + splits + ["total"],
               [[src] + [card["counts_by_source"][s].get(src, 0) for s in splits]
                + [sum(card["counts_by_source"][s].get(src, 0) for s in splits)] for src in sources]
               + [["**all**"] + [counts[s] for s in splits] + [counts["total"]]]),
        "",
        "## Cleaning",
        f"- duplicates removed: {card['duplicates_removed']['exact']} exact, "
        f"{card['duplicates_removed']['near']} near (case/space/punctuation-insensitive)",
        f"- conversations removed because a turn is a near-copy of an evaluation text (data/eval/): "
        f"{len({(x['file'], x['line']) for x in card.get('evaluation_leaks_removed', [])})}",
        f"- empty or unanswered turns dropped: {card['empty_turns_dropped']}",
        "- PII redactions: " + ", ".join(f"{k} {v}" for k, v in card["pii_redactions"].items()),
        f"- rows skipped: {len(card['skipped_rows'])}",
    ]
    if card["duplicates_removed"]["by_source"]:
        out += ["", _table(["source", "duplicates removed"], sorted(card["duplicates_removed"]["by_source"].items()))]
    if card["skipped_rows"]:
        out += ["", "### Skipped rows", _table(["file", "line", "reason"],
                [[Path(r["file"]).name, r["line"], r["reason"]] for r in card["skipped_rows"]])]
    if card.get("evaluation_leaks_removed"):
        out += ["", "### Removed: near-copies of evaluation texts", _table(["file", "line", "turn", "evaluation set"],
                [[Path(x["file"]).name, x["line"], x["text"][:80], x["evaluation_file"]]
                 for x in card["evaluation_leaks_removed"]])]
    if card.get("files_without_new_rows"):
        out += ["", "Files that added no new conversation: " + ", ".join(card["files_without_new_rows"])]
    out += ["", "## Lengths (words)"]
    rows = []
    for s in splits:
        for what, stats in card["lengths"][s].items():
            if stats.get("n"):
                rows.append(
                    [s, what, stats["n"], stats["min"], stats["median"], stats["mean"], stats["p95"], stats["max"]]
                )
    out += [_table(["split", "measure", "n", "min", "median", "mean", "p95", "max"], rows),
            "", "![length distribution](length_distribution.png)", ""]
    return "\n".join(out)



def corpus_table(profile: dict[str, dict]) -> str:
    """Markdown table of ``utils.data.corpus_profile``: what a corpus's data card shows per category."""
    return _table(["category", "conversations", "multi-turn", "replies", "words p10", "median", "p90", "max",
                   "replies of 30-120 words"],
                  [[name, p["conversations"], f"{p['multi_turn']} ({p['multi_turn'] / p['conversations']:.0%})",
                    p["replies"], p["words_p10"], p["words_median"], p["words_p90"], p["words_max"],
                    f"{p['within_30_120']:.0%}"] for name, p in profile.items()])


def _card_root(run: dict) -> str:
    """The run folder as the card shows it: relative to the repository when inside it."""
    out = run["config"]["output_dir"]
    return shown(from_root(out) if out else adapter_root(run["model"]))


def model_card(run: dict, spec: dict) -> str:
    card = spec.get("card", {})
    rows = [
        ("Model Type", card.get("type", "Decoder-only Transformer")),
        ("Size", card.get("size", f"{run['total_params'] / 1e6:.0f}M parameters")),
        ("Base", f"`{run['base_model']}`"),
        (
            "Fine-Tuning",
            f"{method_text(run)}, {base_precision(run)} base weights",
        ),
        (
            "Trainable parameters",
            f"{run['trainable_params']:,} of {run['total_params']:,} ({run['trainable_percent']:.3f}%)",
        ),
        (
            "Training data",
            f"{run['examples']['train']} conversations from {run['data_dir']} (sha256 {run['data_sha256'][:12]})",
        ),
        ("Best validation loss", f"{run['best_eval_loss']:.4f}" if run["best_eval_loss"] is not None else "n/a"),
        ("Intended Use", "Research on parameter-efficient fine-tuning; conversational text generation"),
        ("Limitations", "May hallucinate or be incoherent; not a substitute for professional advice"),
        ("License", card.get("licence", "see the base model")),
    ]
    lines = [f"# {run['model']} LoRA", ""]
    if run.get("random_init"):
        lines += [f"**{models.RANDOM_WEIGHTS_LABEL}** — this adapter was trained on random base weights.", ""]
    lines += ["| Field | Value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    lines += [
        "",
        "Load it:",
        "",
        "```python",
        "from peft import PeftModel",
        f'model = PeftModel.from_pretrained(base_model, "{final_adapter(_card_root(run))}")',
        "```",
        "",
    ]
    return "\n".join(lines)


def dpo_card(run: dict, summary: str) -> str:
    """The model card of a DPO adapter (``utils.dpo``): what it continues, on which pairs, how to load it."""
    pairs = run["preference_pairs"]
    rows = [("Base", f"`{run['base_model']}`"),
            ("Starts from", f"the SFT LoRA adapter `{run['sft_adapter']}/final` (also the frozen reference)"),
            ("Fine-Tuning", f"DPO (TRL), beta {run['beta']}, LoRA on {'8-bit' if run['load_in_8bit'] else 'fp32'} "
                            "base weights"),
            ("Trainable parameters", f"{run['trainable_params']:,}"),
            ("Preference pairs", f"{pairs['train']} to train, {pairs['held_out']} held out; by source "
                                 + ", ".join(f"{k} {v}" for k, v in pairs["by_source"].items())
                                 + f" (`{pairs['file']}`)"),
            ("Intended Use", "Research on preference tuning of small models"),
            ("Limitations", "Preferences of one small judge or a few voters; may hallucinate; not professional "
                            "advice")]
    lines = [f"# {run['model']} LoRA + DPO", ""]
    if run.get("random_init"):
        lines += [f"**{models.RANDOM_WEIGHTS_LABEL}**: trained on random base weights.", ""]
    lines += ["| Field | Value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    root = f"<models>/{run['model']}-dpo"
    lines += ["", summary, "", f"Load it like the SFT adapter: `utils.models.load_finetuned(\"{root}\")`, or "
              f"`PeftModel.from_pretrained(base, \"{root}/final\")`.", ""]
    return "\n".join(lines)
