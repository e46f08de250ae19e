"""Side-by-side evaluation: every model, base and fine-tuned (adapter merged), answers the same
held-out prompts greedily; replies are scored (``utils.metrics``) and summarised with bootstrap
intervals and paired win rates. Results go to ``<report_dir>/evaluation.json`` and
``<report_dir>/samples.jsonl``.
"""
from __future__ import annotations

import gc
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from . import chat, generation, metrics, models, safety
from .data import read_jsonl
from .io import write_json_atomically, write_text_atomically
from .paths import MODELS_DIR, from_root

METRICS = ("words", "new_tokens", "latency_s", "rouge_l", "chrf", "similarity", "relevance", "coherence",
           "fluency", "non_repetition", "rubric")
WIN_METRICS = ("coherence", "relevance", "similarity", "rouge_l")


class EvaluationError(ValueError):
    pass


@dataclass
class EvalConfig:
    """Parameters of ``notebooks/03_evaluate.ipynb`` (same names)."""

    models: list = field(default_factory=lambda: ["smollm2-135m", "gemma3-270m"])
    data_dir: str = "data/processed"
    split: str = "test"
    num_examples: int = 40
    max_new_tokens: int = 64
    batch_size: int = 8
    seed: int = 42
    report_dir: str | None = None
    judge_model: str = "smollm2-135m"
    loss_examples: int = 64  # held-out conversations for validation loss / perplexity
    models_dir: str = str(MODELS_DIR)


def pick_examples(rows: Sequence[dict], n: int, seed: int) -> list[dict]:
    """A seeded sample of ``n`` conversations (all of them if fewer), in file order."""
    if n <= 0:
        raise EvaluationError(f"num_examples={n}; expected > 0")
    idx = sorted(random.Random(seed).sample(range(len(rows)), min(n, len(rows))))
    return [rows[i] for i in idx]


def split_prompt(row: dict) -> tuple[list[dict], str, str]:
    """History up to the last assistant turn, the last user message, and the reference reply."""
    msgs = row["messages"]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    history = msgs[:last]
    user = next(m["content"] for m in reversed(history) if m["role"] == "user")
    return history, user, msgs[last]["content"]


def heldout_loss(model, tokenizer, fmt: str, rows: Sequence[dict], max_seq_len: int = 256, batch_size: int = 8) -> dict:
    """Token-weighted cross-entropy on assistant tokens, and perplexity = exp(loss)."""
    import torch
    from transformers import DataCollatorForSeq2Seq

    from .training import encode_rows

    encoded, _ = encode_rows(rows, tokenizer, fmt, max_seq_len)
    collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=chat.IGNORE_INDEX)
    total, count = 0.0, 0
    for i in range(0, len(encoded), batch_size):
        batch = collate([{k: r[k] for k in ("input_ids", "attention_mask", "labels")} for r in encoded[i:i + batch_size]])
        with torch.inference_mode():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=chat.IGNORE_INDEX, reduction="sum")
        total += float(loss)
        count += int((labels != chat.IGNORE_INDEX).sum())
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count, "n": len(encoded)}


def variants(model: str, models_dir: Path) -> list[dict]:
    """The base model and, when an adapter exists, the fine-tuned one."""
    out = [{"name": f"{models.resolve(model)['name']} (base)", "model": model, "kind": "base"}]
    adapter = models_dir / f"{models.resolve(model)['name']}-lora"
    if (adapter / "final" / "adapter_config.json").exists():
        out.append({"name": f"{models.resolve(model)['name']} (LoRA)", "model": model, "kind": "lora",
                    "adapter": str(adapter)})
    return out


def _load(variant: dict):
    if variant["kind"] == "base":
        return models.load_model(variant["model"])
    return models.load_finetuned(variant["adapter"], merge=True)


def evaluate(cfg: EvalConfig, log=print) -> dict:
    """Generate, score and summarise; returns the evaluation dict (also written to report_dir)."""
    from tqdm.auto import tqdm

    data_dir = from_root(cfg.data_dir)
    path = data_dir / f"{cfg.split}.jsonl"
    if not path.exists():
        raise EvaluationError(f"{path} not found: run notebooks/01_data_prep.ipynb first (or `make pipeline`)")
    if not cfg.models:
        raise EvaluationError("models is empty; expected at least one preset, folder or hub id")
    examples = pick_examples(read_jsonl(path), cfg.num_examples, cfg.seed)
    loss_rows = read_jsonl(data_dir / "validation.jsonl")[: cfg.loss_examples]
    histories, prompts, references = zip(*(split_prompt(r) for r in examples))
    models_dir = from_root(cfg.models_dir)

    all_variants = [v for m in cfg.models for v in variants(m, models_dir)]
    missing = [m for m in cfg.models if not any(v["kind"] == "lora" and v["model"] == m for v in all_variants)]
    if missing:
        log(f"no trained adapter for {missing} under {models_dir}: evaluating their base model only "
            "(run notebooks/02_train_lora.ipynb)")
    replies: dict[str, list[generation.Generated]] = {}
    info: dict[str, dict] = {}
    for variant in tqdm(all_variants, desc="models"):
        loaded = _load(variant)
        fmt = chat.chat_format(loaded.spec, loaded.tokenizer)
        start = time.perf_counter()
        replies[variant["name"]] = generation.generate_batch(
            loaded.model, loaded.tokenizer, histories, fmt, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
        gen_seconds = time.perf_counter() - start
        held = heldout_loss(loaded.model, loaded.tokenizer, fmt, loss_rows, batch_size=cfg.batch_size)
        info[variant["name"]] = {**variant, "chat_format": fmt, "generation_seconds": round(gen_seconds, 2),
                                 "total_params": loaded.info["total_params"], "heldout": held,
                                 "random_init": loaded.info.get("random_init", False)}
        if variant["kind"] == "lora":
            run = models.read_run(variant["adapter"])
            info[variant["name"]]["trainable"] = {k: run[k] for k in ("trainable_params", "total_params", "trainable_percent")}
        log(f"{variant['name']}: {len(histories)} replies in {gen_seconds:.1f}s; held-out loss {held['loss']:.3f}")
        del loaded
        gc.collect()

    scorer = metrics.Scorer(metrics.Embedder(), metrics.Judge(cfg.judge_model) if cfg.judge_model else None)
    per_example: dict[str, list[dict]] = {}
    for name, gens in replies.items():
        texts = [g.text for g in gens]
        scores = scorer.score(prompts, texts, references,
                              progress=lambda it, name=name: tqdm(it, desc=f"scoring {name}", leave=False))
        per_example[name] = [{"reply": g.text, "new_tokens": g.new_tokens, "latency_s": g.latency_s / g.batch_size,
                              "crisis_flag": safety.crisis_flag(p) or safety.crisis_flag(g.text), **s}
                             for p, g, s in zip(prompts, gens, scores)]

    summary = {name: {m: metrics.bootstrap_ci([r.get(m) for r in rows], seed=cfg.seed) for m in METRICS}
               for name, rows in per_example.items()}
    wins = {}
    by_model = {}
    for v in all_variants:
        by_model.setdefault(v["model"], {})[v["kind"]] = v["name"]
    for model, kinds in by_model.items():
        if "lora" in kinds:
            wins[f"{kinds['lora']} vs {kinds['base']}"] = _wins(per_example[kinds["lora"]], per_example[kinds["base"]], cfg.seed)
    finals = [kinds.get("lora", kinds["base"]) for kinds in by_model.values()]
    if len(finals) >= 2:
        wins[f"{finals[0]} vs {finals[1]}"] = _wins(per_example[finals[0]], per_example[finals[1]], cfg.seed)

    result = {
        "schema": 1,
        "config": asdict(cfg),
        "n_examples": len(examples),
        "example_ids": [r["id"] for r in examples],
        "variants": info,
        "summary": summary,
        "win_rates": wins,
        "scores_explained": metrics.__doc__,
        "judge_model": cfg.judge_model,
    }
    samples = [{"id": ex["id"], "prompt": p, "reference": ref,
                **{name: per_example[name][i]["reply"] for name in per_example},
                "crisis_flag": any(per_example[name][i]["crisis_flag"] for name in per_example)}
               for i, (ex, p, ref) in enumerate(zip(examples, prompts, references))]
    result["per_example"] = per_example
    result["samples"] = samples
    if cfg.report_dir:
        report_dir = from_root(cfg.report_dir)
        write_json_atomically(report_dir / "evaluation.json", result)
        write_text_atomically(report_dir / "samples.jsonl",
                              "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    return result


def _wins(a: list[dict], b: list[dict], seed: int) -> dict:
    return {m: metrics.win_rate([r[m] for r in a], [r[m] for r in b], seed=seed) for m in WIN_METRICS}
