"""Preference tuning (DPO) of a fine-tuned model: TRL's ``DPOTrainer`` continues the SFT LoRA adapter
on ``{prompt, chosen, rejected}`` pairs (``utils.preferences``), with the base weights in 8-bit
(bitsandbytes) as in SFT. The reference policy is the SFT model itself: TRL copies the loaded adapter
into a frozen "ref" adapter, so DPO measures how far it moves from the SFT model, not from the base.

    python -m utils.dpo --model smollm2-135m            # pairs from data/preferences/<name>.jsonl

The result is a LoRA adapter of the same shape as the SFT one in ``<models_dir>/<name>-dpo/final``
(with ``run.json`` and ``MODEL_CARD.md``): the evaluation compares it as a third variant,
``<name> (DPO)``, beside the base model and the SFT adapter. Checkpoints every ``save_steps``; a run
that stopped resumes from its last complete one. A tenth of the pairs (at least one when there
are ten) is held out: the preference accuracy on them (how often the tuned model gives the chosen reply
a larger reward than the rejected one, reward = beta x log-ratio to the SFT model) is measured
before training (0: policy and reference are the same model, every reward is 0 and none is larger;
the loss is log 2) and after.
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from . import cards, chat, hardware, int8, models, system
from .io import write_directory_atomically, write_json_atomically, write_text_atomically
from .paths import MODELS, adapter_root, final_adapter, from_root, has_adapter, shown
from .preferences import MIN_PAIRS, PairsConfig, card_path, pairs_path, read_pairs
from .training import count_parameters, last_complete_checkpoint

DPO_SUFFIX = "-dpo"
REPORT_SUBDIR = "preference"  # a pipeline report's DPO run records (<report_dir>/preference/<model>.json)
SCHEMA = 1


class DPOError(ValueError):
    pass


@dataclass
class DPOSettings:
    """How the DPO stage trains (after the pairs are made)."""

    output_dir: str | None = None  # None: <models_dir>/<name>-dpo
    beta: float = 0.1  # how far from the SFT model the policy may move (larger: less)
    learning_rate: float = 5e-5  # LoRA weights, continuing from the SFT adapter
    num_epochs: float = 2.0  # passes over the training pairs
    max_steps: int = -1  # > 0 overrides num_epochs
    batch_size: int = 4  # pairs per device step (each pair is two sequences)
    gradient_accumulation_steps: int = 1  # device steps per optimizer update
    max_seq_len: int = 320  # prompt + reply tokens; longer ones are cut at the end
    save_steps: int = 10  # checkpoint every this many optimizer steps (resume from the last complete one)
    logging_steps: int = 2  # loss and reward margin logged every this many steps
    load_in_8bit: bool = True  # 8-bit base weights (bitsandbytes), as in SFT
    dtype: str = "auto"  # bf16 autocast where the CPU has it natively, else fp32
    resume: bool = True  # continue from the last complete checkpoint in output_dir


@dataclass
class PreferenceNotebook(DPOSettings, PairsConfig):
    """Parameters of ``notebooks/06_preference.ipynb``: make the pairs, then train DPO on them."""

    export_pairs: bool = True  # make the pairs first (False: train on the pairs file as it is)
    report_dir: str | None = None  # set by the pipeline: the run record and figure are copied there


def dpo_root(name: str, models_dir: str | Path = MODELS) -> Path:
    """The DPO run folder of the preset called ``name``: ``<models_dir>/<name>-dpo``."""
    return from_root(models_dir) / f"{name}{DPO_SUFFIX}"


def _output_dir(cfg: PreferenceNotebook) -> Path:
    return from_root(cfg.output_dir) if cfg.output_dir else dpo_root(models.resolve(cfg.model)["name"], cfg.models_dir)


def validate(cfg: PreferenceNotebook) -> None:
    cfg.validate()
    checks = [(cfg.beta > 0, f"beta={cfg.beta!r}; expected > 0"),
              (cfg.learning_rate > 0, f"learning_rate={cfg.learning_rate!r}; expected > 0"),
              (cfg.max_steps > 0 or cfg.num_epochs > 0, "expected max_steps > 0 or num_epochs > 0"),
              (cfg.batch_size >= 1, f"batch_size={cfg.batch_size!r}; expected >= 1"),
              (cfg.gradient_accumulation_steps >= 1,
               f"gradient_accumulation_steps={cfg.gradient_accumulation_steps!r}; expected >= 1"),
              (cfg.max_seq_len >= 16, f"max_seq_len={cfg.max_seq_len!r}; expected >= 16 tokens"),
              (cfg.save_steps >= 1, f"save_steps={cfg.save_steps!r}; expected >= 1"),
              (cfg.dtype in hardware.COMPUTE_DTYPES, f"dtype={cfg.dtype!r}; expected one of "
                                                     f"{list(hardware.COMPUTE_DTYPES)}")]
    for ok, message in checks:
        if not ok:
            raise DPOError(message)


def split_pairs(pairs: Sequence[dict], seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded tenth of the pairs held out (at least one once there are ten), the rest to train."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_eval = len(pairs) // 10
    held = set(order[:n_eval])
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


def as_trl(pairs: Sequence[dict], tokenizer, fmt: str) -> list[dict]:
    """The pairs in the form TRL tokenizes exactly as SFT did: conversational where the model has a
    chat template (TRL applies it), else text in the repository's plain format (TRL adds the end token)."""
    if fmt == "template":
        return [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs]
    out = []
    for p in pairs:
        prompt = chat.render(p["prompt"], tokenizer, fmt, add_generation_prompt=True)
        out.append({"prompt": prompt, "chosen": " " + p["chosen"][0]["content"],
                    "rejected": " " + p["rejected"][0]["content"]})
    return out


def _load_policy(cfg: PreferenceNotebook, sft_root: Path, log):
    """The base model (8-bit where asked) with the SFT adapter loaded trainable."""
    from peft import PeftModel, prepare_model_for_kbit_training

    run = models.read_run(sft_root)
    loaded = models.load_model(run["config"]["model"], load_in_8bit=cfg.load_in_8bit,
                               random_init=run.get("random_init", False))
    models.check_adapter_matches(final_adapter(sft_root), loaded)
    model = loaded.model
    slimmed = 0
    if loaded.info["load_in_8bit"]:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        slimmed = int8.slim_frozen_8bit(model)  # as in SFT: frozen 8-bit layers keep no input for backward
    model = PeftModel.from_pretrained(model, str(final_adapter(sft_root)), is_trainable=True)
    log(f"policy: {loaded.spec['name']} ({'8-bit' if loaded.info['load_in_8bit'] else 'fp32'} base weights) + the "
        f"SFT adapter {shown(final_adapter(sft_root))}, trainable; the reference is a frozen copy of that adapter")
    return loaded, model, run, slimmed


def _dpo_args(cfg: PreferenceNotebook, output_dir: Path, dtype: str):
    import torch
    from trl import DPOConfig

    return DPOConfig(
        output_dir=str(output_dir), beta=cfg.beta, learning_rate=cfg.learning_rate, num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1, per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        max_length=cfg.max_seq_len, lr_scheduler_type="cosine", warmup_steps=0, bf16=dtype == "bf16",
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=2, eval_strategy="no",
        logging_steps=cfg.logging_steps, seed=cfg.seed, data_seed=cfg.seed, report_to=[],
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, remove_unused_columns=False,
        run_name=output_dir.name, disable_tqdm=False, **_no_checkpointing(DPOConfig),
    )


def _no_checkpointing(config_class) -> dict:
    """TRL turns activation checkpointing on by default; off here, as in SFT: the models are small, and
    bitsandbytes' CPU 8-bit matmul keeps its input anyway (see utils.training)."""
    fields = config_class.__dataclass_fields__
    return {"activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing": False}


def train(cfg: PreferenceNotebook, log=print, extra_callbacks: Sequence = ()) -> dict:
    """DPO on the pairs file of ``cfg``; returns the run record (also ``<output_dir>/run.json``)."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import DPOTrainer

    validate(cfg)
    name = models.resolve(cfg.model)["name"]
    sft_root = adapter_root(name, cfg.models_dir)
    if not has_adapter(sft_root):
        raise DPOError(f"no SFT adapter for {cfg.model} under {shown(from_root(cfg.models_dir))}: run "
                       "notebooks/02_train_lora.ipynb first (DPO continues it)")
    path = pairs_path(cfg)
    pairs = read_pairs(path)
    if len(pairs) < MIN_PAIRS:
        raise DPOError(f"{shown(path)} holds {len(pairs)} preference pair(s); DPO needs at least {MIN_PAIRS} (vote "
                       "in the dashboard's blind arena, or make more of the judge's pairs: raise num_prompts)")
    pair_card = json.loads(card_path(path).read_text()) if card_path(path).exists() else {}
    train_pairs, eval_pairs = split_pairs(pairs, cfg.seed)
    output_dir = _output_dir(cfg)
    output_dir.mkdir(parents=True, exist_ok=True)

    set_seed(cfg.seed)
    loaded, model, sft_run, slimmed = _load_policy(cfg, sft_root, log)
    tokenizer = loaded.tokenizer
    fmt = chat.chat_format(loaded.spec, tokenizer)
    dtype = hardware.pick_dtype(cfg.dtype, "training", allowed=hardware.COMPUTE_DTYPES)
    args = _dpo_args(cfg, output_dir, dtype)
    with models.quiet_bnb():
        trainer = DPOTrainer(model=model, args=args, processing_class=tokenizer,
                             train_dataset=Dataset.from_list(as_trl(train_pairs, tokenizer, fmt)),
                             eval_dataset=(Dataset.from_list(as_trl(eval_pairs, tokenizer, fmt)) if eval_pairs
                                           else None),
                             callbacks=list(extra_callbacks))
    keep_fp32(trainer.model)
    params = count_parameters(trainer.model)
    params["trainable_params"] = sum(p.numel() for n, p in trainer.model.named_parameters()
                                     if p.requires_grad and ".default." in n)
    log(f"DPO on {len(train_pairs)} pairs ({len(eval_pairs)} held out), beta {cfg.beta}, {dtype}: "
        f"{params['trainable_params']:,} trainable parameters (the SFT adapter's)")
    before = trainer.evaluate() if eval_pairs else {}
    checkpoint = last_complete_checkpoint(output_dir, log) if cfg.resume else None
    if checkpoint is not None:
        log(f"resuming from {checkpoint.name}")
    start = time.perf_counter()
    memory = system.MemorySampler().start()
    with models.quiet_bnb():
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    memory.stop()
    seconds = time.perf_counter() - start
    after = trainer.evaluate() if eval_pairs else {}
    history = trainer.state.log_history

    def held(metrics: dict) -> dict | None:
        if not metrics:
            return None
        return {k: metrics.get(f"eval_{k}") for k in ("loss", "rewards/accuracies", "rewards/margins")} | {
            "n": len(eval_pairs)}

    run = {
        "schema": SCHEMA, "method": "dpo", "model": name, "base_model": sft_run["base_model"],
        "source": sft_run.get("source"), "weights": sft_run.get("weights"), "gguf_sha256": sft_run.get("gguf_sha256"),
        "random_init": sft_run.get("random_init", False), "label": sft_run.get("label"),
        "load_in_8bit": loaded.info["load_in_8bit"], "load_in_8bit_fallback": loaded.info.get("load_in_8bit_fallback"),
        "load_in_4bit": False, "peft_method": "lora", "slim_8bit_layers": slimmed, "chat_format": fmt,
        "lora": sft_run.get("lora"), "sft_adapter": shown(sft_root),
        "config": {**asdict(cfg), "model": sft_run["config"]["model"]},
        "preference_pairs": {"file": shown(path), "n": len(pairs), "train": len(train_pairs),
                             "held_out": len(eval_pairs),
                             "by_source": dict(pair_card.get("by_source") or _count_sources(pairs)),
                             "judge_prompts": pair_card.get("judge_prompts"), "left_out": pair_card.get("left_out")},
        "trainable_params": params["trainable_params"], "total_params": sft_run.get("total_params"),
        "trainable_percent": sft_run.get("trainable_percent"),
        "beta": cfg.beta, "global_step": trainer.state.global_step,
        "resumed_from": checkpoint.name if checkpoint else None,
        "held_out_before": held(before), "held_out_after": held(after),
        "loss_history": {"train": [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h],
                         "validation": []},
        "reward_history": [{"step": h["step"], "accuracy": h.get("rewards/accuracies"),
                            "margin": h.get("rewards/margins")} for h in history if "rewards/margins" in h],
        "train_loss": result.training_loss, "train_runtime_s": round(seconds, 2),
        "peak_train_rss_mb": round(memory.peak_rss_mb, 1), "dtype": dtype, "dtype_probe": hardware.dtype_probe(),
        "versions": {**system.versions(), **system.versions(("trl",))},
    }

    def write_final(folder: Path) -> None:
        # no embedding layer is adapted: without this PEFT looks the base model's config up on the hub
        trainer.model.save_pretrained(folder, safe_serialization=True, selected_adapters=["default"],
                                      save_embedding_layers=False)
        tokenizer.save_pretrained(folder)
        config_file = folder / "adapter_config.json"
        config = json.loads(config_file.read_text())
        config["base_model_name_or_path"] = sft_run["base_model"]
        config_file.write_text(json.dumps(config, indent=2) + "\n")

    write_directory_atomically(final_adapter(output_dir), write_final)
    write_json_atomically(output_dir / "run.json", run)
    write_text_atomically(output_dir / "MODEL_CARD.md", model_card(run))
    plot_rewards(run, output_dir / "dpo_curves.png")
    return run


def keep_fp32(model) -> int:
    """Trainable weights back to fp32; returns how many tensors were cast. TRL stores the trainable LoRA
    weights of a quantized model in bf16 (as QLoRA does), but an Adam step of a few 1e-5 on weights of a
    few 1e-2 is below bf16's resolution there (about 2e-4) and is rounded away: in the first example run
    the DPO adapters barely moved. fp32 weights and optimizer state, bf16 autocast for the matmuls: as in
    SFT. (Before the optimizer exists: the Trainer builds it when training starts.)"""
    import torch

    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
            cast += 1
    return cast


def _count_sources(pairs: Sequence[dict]) -> dict:
    from collections import Counter

    return dict(Counter(p.get("source", "unknown") for p in pairs))


def summary(run: dict) -> str:
    """What a DPO run did, in a few sentences (markdown)."""
    p = run["preference_pairs"]
    sources = ", ".join(f"{v} from the {k}" for k, v in p["by_source"].items())
    lines = [f"DPO continued the SFT adapter of **{run['model']}** on **{p['train']} preference pairs** ({sources}; "
             f"{p['held_out']} more held out) for {run['global_step']} steps, beta {run['beta']}, "
             f"{'8-bit' if run['load_in_8bit'] else 'fp32'} base weights, {run['dtype']} compute, "
             f"{run['train_runtime_s']:.0f} s."]
    b, a = run.get("held_out_before"), run.get("held_out_after")
    if a and a.get("rewards/accuracies") is not None:
        from .ratings import wilson_interval

        low, high = wilson_interval(round(a["rewards/accuracies"] * a["n"]), a["n"])
        lines.append(f"On the held-out pairs the tuned model gives the chosen reply the larger reward in "
                     f"{a['rewards/accuracies']:.2f} [{low:.2f}, {high:.2f}] of {a['n']} (before training "
                     f"{b['rewards/accuracies']:.2f}: the SFT model is its own reference); mean reward margin "
                     f"{a['rewards/margins']:+.3f}.")
    else:
        lines.append("Too few pairs to hold any out (fewer than ten): no held-out preference accuracy.")
    return " ".join(lines)


def model_card(run: dict) -> str:
    return cards.dpo_card(run, summary(run))


def plot_rewards(run: dict, path: Path | None = None):
    """DPO loss and the reward margin (chosen minus rejected) of the training batches, by step."""
    from . import plots

    return plots.plot_dpo(run, path)


def export_to_report(run: dict, output_dir: Path, report_dir: Path) -> None:
    """Copy the run record and figure into a pipeline report folder."""
    import shutil

    (report_dir / "figures").mkdir(parents=True, exist_ok=True)
    (report_dir / REPORT_SUBDIR).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(output_dir / "dpo_curves.png", report_dir / "figures" / f"dpo_curves-{run['model']}.png")
    shutil.copyfile(output_dir / "run.json", report_dir / REPORT_SUBDIR / f"{run['model']}.json")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m utils.dpo --model NAME [--export-pairs true] [...]``: every notebook-06 parameter is an option."""
    import argparse
    import dataclasses

    from .preferences import PreferenceError, export
    from .training import _cli_bool

    parser = argparse.ArgumentParser(prog="python -m utils.dpo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(PreferenceNotebook):
        kind = {"int": int, "float": float, "bool": _cli_bool}.get(str(f.type), str)
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default)
    cfg = PreferenceNotebook(**vars(parser.parse_args(argv)))
    try:
        if cfg.export_pairs:
            export(cfg)
        run = train(cfg)
    except (DPOError, PreferenceError, models.ModelError) as err:
        print(f"python -m utils.dpo: error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: run[k] for k in ("model", "global_step", "preference_pairs", "held_out_after")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
