"""Benchmarks that write their figures to JSON under ``reports/benchmarks/``.

    python -m utils.benchmark train [--model smollm2-135m] [--steps 12]

``train`` compares this repo's training recipe (dynamic padding, length-grouped batches) with
the common tutorial recipe (every example padded to ``max_seq_len``) on the same model, data,
batch and steps, in full precision and 8-bit, each variant in its own process so that memory
figures do not mix. It also measures this machine's fp32 matmul rate in the same run, so the
throughput can be read as a fraction of the compute limit: a LoRA step costs about
4 x parameters FLOPs per token (2 forward, 2 backward for the activations' gradients; the
frozen weights need no weight gradients).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from dataclasses import dataclass, field
from pathlib import Path

from .hardware import COMPUTE_DTYPES
from .io import write_json_atomically
from .paths import MODELS, PROCESSED, REPORTS_DIR
from .roofline import (Bound, matvec_bandwidth, measure_variant, memory_bandwidth, share_of_bound,  # noqa: F401
                       share_text, weight_bytes_read_per_token)
from .system import lifetime_peak_rss_mb, machine

BENCH_DIR = REPORTS_DIR / "benchmarks"


@dataclass
class BenchConfig:
    """Parameters of ``notebooks/04_benchmark.ipynb`` (its parameters cell is generated from this class)."""

    models: list = field(default_factory=lambda: ["smollm2-135m", "gemma3-270m"])  # with adapters where trained
    random_models: list = field(default_factory=lambda: ["gpt2", "tinyllama"])  # the original pair, random weights
    new_tokens: int = 32  # tokens generated per measurement (fixed)
    repeats: int = 2  # repetitions per prompt (3 prompts)
    dtype: str = "auto"  # full-precision variants: "bf16", "fp32", or "auto" (bf16 where the CPU has it natively)
    engines: list = field(default_factory=lambda: ["torch", "llama.cpp"])  # "llama.cpp": also decode there
    agreement_prompts: int = 20  # domain-suite prompts x 32 tokens compared between the engines
    report_dir: str | None = None  # where latency.json and figures go (the pipeline sets it)
    models_dir: str = MODELS  # where trained adapters are (<models_dir>/<name>-lora/final)


def matmul_rates(dtypes=("fp32", "bf16")) -> dict[str, float]:
    """Best matrix-multiply rate (FLOP/s) of each dtype on this process's torch threads. 2048x2048
    where the dtype is fast; 512x512 where it is not (bf16 without native support runs ~100x
    slower than fp32, and one 2048 product would take half a minute)."""
    from .hardware import matmul_rate

    rates = {}
    for dtype in dtypes:
        quick = matmul_rate(dtype, n=512, min_seconds=0.05, min_reps=2)
        rates[dtype] = max(quick, matmul_rate(dtype, n=2048, min_reps=5)) if quick > 20e9 else quick
    return rates


# --------------------------------------------------------------------------- training throughput

TRAIN_VARIANTS = {
    "repo-fp32": {"padding": "dynamic", "load_in_8bit": False, "dtype": "fp32"},
    "tutorial-fp32": {"padding": "max_length", "load_in_8bit": False, "dtype": "fp32"},
    "repo-8bit": {"padding": "dynamic", "load_in_8bit": True, "dtype": "fp32"},
    "tutorial-8bit": {"padding": "max_length", "load_in_8bit": True, "dtype": "fp32"},
    "repo-fp32-ckpt": {"padding": "dynamic", "load_in_8bit": False, "gradient_checkpointing": True, "dtype": "fp32"},
    "repo-8bit-ckpt": {"padding": "dynamic", "load_in_8bit": True, "gradient_checkpointing": True, "dtype": "fp32"},
    # glibc hands freed buffers back at once (training's lean_allocator): less peak memory, fewer
    # tokens/s; asked for by name (--variants), e.g. for a model that barely fits
    "repo-fp32-lean": {"padding": "dynamic", "load_in_8bit": False, "lean_allocator": True, "dtype": "fp32"},
    "repo-8bit-lean": {"padding": "dynamic", "load_in_8bit": True, "lean_allocator": True, "dtype": "fp32"},
    # bf16 autocast (fp32 LoRA weights): run by default only where the CPU has native bf16; without it
    # bf16 matmuls are ~50-100x slower than fp32 and this variant alone would take many minutes
    "repo-bf16": {"padding": "dynamic", "load_in_8bit": False, "dtype": "bf16"},
}


def default_train_variants() -> list[str]:
    from .hardware import fast_bf16

    return [v for v in TRAIN_VARIANTS if not v.endswith("-lean") and (v != "repo-bf16" or fast_bf16())]


def _train_variant(args: argparse.Namespace) -> None:
    """One variant, in a fresh process: prints its figures as one JSON line."""
    from .system import private_rss_mb
    from .training import TrainConfig, train

    variant = TRAIN_VARIANTS[args.variant]
    baseline = private_rss_mb()
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(model=args.model, data_dir=args.data_dir, output_dir=out, max_steps=args.steps,
                          eval_steps=args.steps, save_steps=args.steps, batch_size=args.batch_size,
                          max_seq_len=args.max_seq_len, max_eval_examples=8, resume=False, seed=0,
                          random_init=args.random_init, **variant)
        run = train(cfg, log=lambda *a: None).run
    print("RESULT " + json.dumps({
        "variant": args.variant, **variant,
        "tokens": run["train_tokens"], "step_time_s": run["train_step_time_s"],
        "tokens_per_s": run["train_tokens_per_s"], "total_params": run["total_params"],
        "dtype_used": run["dtype"], "best_eval_loss": run["best_eval_loss"], "allocator": run.get("allocator"),
        "trainable_params": run["trainable_params"], "load_in_8bit_used": run["load_in_8bit"],
        "model_memory_mb": run["model_memory_mb"], "peak_rss_mb": run["peak_rss_mb"],
        "peak_private_rss_mb": run["peak_private_rss_mb"], "peak_train_rss_mb": run["peak_train_rss_mb"],
        "baseline_private_rss_mb": round(baseline, 1),
        "peak_private_rss_delta_mb": round(run["peak_private_rss_mb"] - baseline, 1),
    }), flush=True)


def train_benchmark(model: str = "smollm2-135m", steps: int = 12, batch_size: int = 8, max_seq_len: int = 256,
                    data_dir: str = PROCESSED, variants=None, out_dir: Path = BENCH_DIR,
                    random_init: bool = False) -> dict:
    """Training throughput and memory of each variant, each in a fresh process. ``random_init``
    trains an architecture-exact random-weight stand-in (speed and memory only)."""
    from tqdm.auto import tqdm

    variants = list(variants) if variants else default_train_variants()
    results = {}
    for name in tqdm(variants, desc="training variants"):
        cmd = [sys.executable, "-m", "utils.benchmark", "_train-variant", "--variant", name, "--model", model,
               "--steps", str(steps), "--batch-size", str(batch_size), "--max-seq-len", str(max_seq_len),
               "--data-dir", data_dir] + (["--random-init"] if random_init else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"variant {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        results[name] = json.loads(line[len("RESULT "):])

    rates = matmul_rates()
    best_dtype = max(rates, key=rates.get)
    flops = rates[best_dtype]
    for r in results.values():
        share = share_of_bound(4 * r["total_params"] * r["tokens_per_s"], flops)
        r["compute_fraction"] = None if share is None else round(share, 3)

    def ratio(a, b, key):
        return round(results[a][key] / results[b][key], 3) if a in results and b in results else None

    summary = {
        "speedup_vs_tutorial_fp32": ratio("repo-fp32", "tutorial-fp32", "tokens_per_s"),
        "speedup_vs_tutorial_8bit": ratio("repo-8bit", "tutorial-8bit", "tokens_per_s"),
        "speedup_bf16_vs_fp32": ratio("repo-bf16", "repo-fp32", "tokens_per_s"),
        "eval_loss_bf16_minus_fp32": (
            round(results["repo-bf16"]["best_eval_loss"] - results["repo-fp32"]["best_eval_loss"], 4)
            if "repo-bf16" in results and "repo-fp32" in results
            else None
        ),
        "compute_fraction_repo_fp32": results.get("repo-fp32", {}).get("compute_fraction"),
        "compute_fraction_repo_8bit": results.get("repo-8bit", {}).get("compute_fraction"),
        "model_memory_ratio_8bit_vs_fp32": ratio("repo-8bit", "repo-fp32", "model_memory_mb"),
        # memory while training (sampled inside steps); "private" leaves out file-backed pages such
        # as the memory-mapped fp32 weights, which favours fp32, so the target uses everything resident
        "train_rss_ratio_8bit_vs_fp32": ratio("repo-8bit", "repo-fp32", "peak_train_rss_mb"),
        "train_rss_ratio_8bit_vs_fp32_ckpt": ratio("repo-8bit-ckpt", "repo-fp32-ckpt", "peak_train_rss_mb"),
        "train_rss_ratio_8bit_vs_fp32_lean": ratio("repo-8bit-lean", "repo-fp32-lean", "peak_train_rss_mb"),
        "lean_speed_ratio_8bit": ratio("repo-8bit-lean", "repo-8bit", "tokens_per_s"),
        "lean_memory_ratio_8bit": ratio("repo-8bit-lean", "repo-8bit", "peak_train_rss_mb"),
        "peak_private_rss_ratio_8bit_vs_fp32": ratio("repo-8bit", "repo-fp32", "peak_private_rss_mb"),
        "peak_private_rss_ratio_8bit_vs_fp32_ckpt": ratio("repo-8bit-ckpt", "repo-fp32-ckpt", "peak_private_rss_mb"),
        "checkpointing_memory_ratio_fp32": ratio("repo-fp32-ckpt", "repo-fp32", "peak_train_rss_mb"),
        "checkpointing_speed_ratio_fp32": ratio("repo-fp32-ckpt", "repo-fp32", "tokens_per_s"),
        "peak_rss_ratio_8bit_vs_fp32": ratio(
            "repo-8bit", "repo-fp32", "peak_rss_mb"
        ),  # whole process, loading included
    }
    def at_least(x, bound):
        return None if x is None else x >= bound  # None: a variant it needs was not run

    def at_most(x, bound):
        return None if x is None else x <= bound

    targets = {
        "speedup_vs_tutorial >= 2": at_least(summary["speedup_vs_tutorial_fp32"], 2),
        "compute_fraction >= 0.5": at_least(summary["compute_fraction_repo_fp32"], 0.5),
        "8bit peak training memory <= 0.6x": at_most(summary["train_rss_ratio_8bit_vs_fp32"], 0.6),
        "8bit peak training memory <= 0.6x (gradient checkpointing)": at_most(
            summary["train_rss_ratio_8bit_vs_fp32_ckpt"], 0.6
        ),
        "8bit peak training memory <= 0.6x (lean allocator)": at_most(
            summary["train_rss_ratio_8bit_vs_fp32_lean"], 0.6
        ),
        "8bit model memory <= 0.6x": at_most(summary["model_memory_ratio_8bit_vs_fp32"], 0.6),
        # where the CPU has native bf16 (None where the bf16 variant was not run)
        "bf16 >= 2x fp32 tokens/s": at_least(summary["speedup_bf16_vs_fp32"], 2),
        "bf16 held-out loss within 0.02 of fp32": (
            None if summary["eval_loss_bf16_minus_fp32"] is None else abs(summary["eval_loss_bf16_minus_fp32"]) <= 0.02
        ),
    }
    report = {
        "schema": 1, "benchmark": "train_throughput",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {"model": model, "random_init": random_init, "steps": steps, "batch_size": batch_size,
                     "max_seq_len": max_seq_len,
                     "data_dir": data_dir, "tokens": "non-padding tokens per second of optimizer-step time"},
        "machine": machine(), "matmul_gflops": round(flops / 1e9, 1),
        "matmul_gflops_by_dtype": {k: round(v / 1e9, 1) for k, v in rates.items()}, "compute_bound_dtype": best_dtype,
        "variants": results, "summary": summary, "targets_met": targets,
    }
    out_dir = Path(out_dir)
    stamp = report["when"].replace(":", "").replace("-", "")[:15]
    write_json_atomically(out_dir / f"train_throughput-{stamp}.json", report)
    write_json_atomically(out_dir / "train_throughput-latest.json", report)
    return report


# --------------------------------------------------------------------------- latency, throughput, memory

LATENCY_PROMPTS = [
    "What is artificial intelligence?",
    "Can you recommend a good book to read this weekend?",
    "I have been feeling anxious lately. What can I do?",
]


def _latency_model(args: argparse.Namespace) -> None:
    """All variants of one model, in a fresh process (so its peak memory is its own)."""
    import gc

    import torch

    from . import chat, models
    from .generation import prompt_ids
    from .paths import final_adapter

    torch.manual_seed(0)
    rows = []

    def record(name, loaded_model, tokenizer, ids, batch=1, **extra):
        res = measure_variant(loaded_model, tokenizer, ids, args.new_tokens, args.repeats, batch)
        res.update(variant=name, model=args.model, weight_bytes=weight_bytes_read_per_token(loaded_model),
                   memory_footprint_mb=round(loaded_model.get_memory_footprint() / 2**20, 1), **extra)
        rows.append(res)
        print(f"  {args.model} {name}: {res['latency_mean_s']:.3f}s mean, {res['decode_tokens_per_s']:.1f} tok/s",
              file=sys.stderr, flush=True)

    def adapter_on(base, tokenizer):
        """The trained adapter if there is one; otherwise a fresh LoRA of the same shape (timing only)."""
        from peft import PeftModel, get_peft_model

        from .training import TrainConfig, lora_config, resolve_targets, uses_conv1d

        if args.adapter:
            return PeftModel.from_pretrained(base, str(final_adapter(args.adapter))), "trained adapter"
        spec = models.resolve(args.model)
        targets = resolve_targets(TrainConfig(), spec, base)
        return get_peft_model(
            base, lora_config(TrainConfig(), targets, uses_conv1d(base, targets))
        ), "untrained adapter (timing only)"

    loaded = models.load_model(args.model, random_init=args.random_init)
    if args.dtype == "bf16":
        loaded.model.to(torch.bfloat16)
    prec = args.dtype  # the full-precision variants' dtype, part of their names
    tok = loaded.tokenizer
    if args.random_init:  # random weights: fixed-length token prompts, no meaningful text
        ids = [list(range(10 + 7 * i, 10 + 7 * i + 24)) for i in range(len(LATENCY_PROMPTS))]
    else:
        fmt = chat.chat_format(loaded.spec, tok)
        ids = [prompt_ids(tok, [{"role": "user", "content": p}], fmt) for p in LATENCY_PROMPTS]
    label = {"label": loaded.info.get("label")} if args.random_init else {}
    base = loaded.model.eval()
    record(f"{prec} base", base, tok, ids, **label)
    if not args.random_init:
        peft_model, how = adapter_on(base, tok)
        if prec == "bf16":
            peft_model.to(torch.bfloat16)
        record(f"{prec} LoRA unmerged", peft_model, tok, ids, adapter=how)
        merged = peft_model.merge_and_unload()
        record(f"{prec} LoRA merged", merged, tok, ids, adapter=how)
        record(f"{prec} LoRA merged, batch 8", merged, tok, ids[:1], batch=8, adapter=how)
        del peft_model, merged, base, loaded
        gc.collect()
        q = models.load_model(args.model, load_in_8bit=True)
        if q.info["load_in_8bit"]:
            with models.quiet_bnb():
                record("8-bit base", q.model.eval(), tok, ids[:1])
                peft_q, how = adapter_on(q.model, tok)
                record("8-bit LoRA unmerged", peft_q, tok, ids[:1], adapter=how)
    peak = lifetime_peak_rss_mb()  # this process did nothing else
    print("RESULT " + json.dumps({"model": args.model, "random_init": args.random_init, "peak_rss_mb": round(peak, 1),
                                  "variants": rows}), flush=True)


def summary(bench: dict) -> str:
    """What the latency benchmark showed (markdown): per model, merged LoRA against its base, the
    share of the memory-bandwidth bound, and the targets."""
    dtype = bench["method"]["dtype"]
    lines = []
    for model, c in bench["checks"].items():
        rate = next((r["decode_tokens_per_s"] for r in bench["rows"]
                     if r["model"] == model and r["variant"] == f"{dtype} LoRA merged" and r["batch"] == 1), None)
        met = [k.removeprefix("target_") for k, v in c.items() if k.startswith("target_") and v]
        missed = [k.removeprefix("target_") for k, v in c.items() if k.startswith("target_") and v is False]
        lines.append(f"- **{model}**, LoRA merged ({dtype}): {rate:.1f} tokens/s at batch 1, "
                     f"{c['merged_vs_base_latency']:.2f}x the base model's latency, "
                     f"{share_text(c['merged_roofline_fraction'])} of the bandwidth bound; unmerged adapters add "
                     f"{100 * c['unmerged_overhead']:.0f}%. Targets met: {', '.join(met) or 'none'}"
                     + (f"; not met: {', '.join(missed)}." if missed else "."))
    if not lines:
        lines.append("- No model with base, merged and unmerged variants was measured.")
    ratio = bench.get("original_pair_ratio_tinyllama_over_gpt2")
    if ratio:
        lines.append(f"- The original pair (random weights, speed only): TinyLlama-1.1B takes {ratio:.2f}x "
                     "GPT-2 124M's latency.")
    lines.append(f"- Measured on {bench['machine']['cpu']} with {bench['machine']['torch_threads']} threads.")
    return "\n".join(lines)


def latency_table(bench: dict):
    """The latency benchmark's rows as a DataFrame (notebook 04)."""
    import pandas as pd

    return pd.DataFrame([{
        "model": r["model"] + (" (random weights)" if r["random_init"] else ""), "variant": r["variant"],
        "batch": r["batch"], "avg s": round(r["latency_mean_s"], 3), "median s": round(r["latency_median_s"], 3),
        "p95 s": round(r["latency_p95_s"], 3), "TTFT s": round(r["ttft_mean_s"], 3),
        "decode tok/s": round(r["decode_tokens_per_s"], 1), "of roofline": share_text(r["roofline_fraction"]),
        "footprint MB": r["memory_footprint_mb"], "process peak RSS MB": r["process_peak_rss_mb"]}
        for r in bench["rows"]])


def latency_benchmark(models_list: list[str], random_models: list[str] = ("gpt2", "tinyllama"), new_tokens: int = 32,
                      repeats: int = 2, models_dir: Path | None = None, out_path: Path | None = None,
                      dtype: str = "auto") -> dict:
    """Latency, time to first token, decode rate, memory and roofline fraction for each model's
    variants, and the original pair as architecture-exact random-weight stand-ins. ``dtype`` is
    the full-precision variants' dtype (``auto``: bf16 where the CPU has it natively, else fp32)."""
    from .hardware import pick_dtype

    from tqdm.auto import tqdm

    from . import models as model_registry
    from .paths import MODELS, adapter_root, from_root, has_adapter

    models_dir = from_root(models_dir or MODELS)
    dtype = pick_dtype(dtype, "the latency benchmark", allowed=COMPUTE_DTYPES)
    bandwidth, matvec = Bound(memory_bandwidth, "GB/s"), Bound(matvec_bandwidth, "GB/s")
    bandwidth.sample(), matvec.sample()
    rates = matmul_rates()
    jobs = [(m, False) for m in models_list] + [(m, True) for m in random_models]
    results = []
    for model, random_init in tqdm(jobs, desc="latency benchmark"):
        bandwidth.sample()  # probes spread over the run: the bound is the best of them
        cmd = [sys.executable, "-m", "utils.benchmark", "_latency-model", "--model", model,
               "--new-tokens", str(new_tokens), "--repeats", str(repeats), "--dtype", dtype]
        adapter = adapter_root(model_registry.resolve(model)["name"], models_dir)
        if random_init:
            cmd.append("--random-init")
        elif has_adapter(adapter):
            cmd += ["--adapter", str(adapter)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"latency benchmark of {model} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        results.append(json.loads(line[len("RESULT "):]))

    bandwidth.sample(), matvec.sample()
    rows = []
    for res in results:
        for v in res["variants"]:
            bound = bandwidth.best / v["weight_bytes"]  # decode steps/s if only weight reads cost time
            v["roofline_steps_per_s"] = bound
            v["roofline_fraction"] = share_of_bound(v["decode_steps_per_s"], bound)
            v["random_init"] = res["random_init"]
            v["process_peak_rss_mb"] = res["peak_rss_mb"]
            rows.append(v)

    def find(model, variant):
        return next((r for r in rows if r["model"] == model and r["variant"] == variant and not r["random_init"]), None)

    checks = {}
    for model in models_list:
        base, merged, unmerged = (find(model, f"{dtype} {v}") for v in ("base", "LoRA merged", "LoRA unmerged"))
        if base and merged and unmerged:
            # medians: one slow outlier (a page fault, the other core busy) should not decide a 5% check
            ratio = merged["latency_median_s"] / base["latency_median_s"]
            checks[model] = {
                "merged_roofline_fraction": merged["roofline_fraction"],
                "merged_vs_base_latency": ratio,
                "unmerged_overhead": unmerged["latency_median_s"] / base["latency_median_s"] - 1,
                "target_merged_at_least_half_of_bound": (None if merged["roofline_fraction"] is None
                                                         else merged["roofline_fraction"] >= 0.5),
                "target_merged_within_5pct_of_base": abs(ratio - 1) <= 0.05,
            }
    original = [r for r in rows if r["random_init"] and r["variant"] == f"{dtype} base"]
    ratio = None
    by = {r["model"]: r for r in original}
    if "gpt2" in by and "tinyllama" in by:
        ratio = by["tinyllama"]["latency_mean_s"] / by["gpt2"]["latency_mean_s"]
    report = {
        "schema": 1,
        "benchmark": "latency",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "method": {
            "dtype": dtype,
            "new_tokens": new_tokens,
            "min_new_tokens": new_tokens,
            "decoding": "greedy",
            "repeats": repeats,
            "prompts": LATENCY_PROMPTS,
            "warmup": 1,
            "decode_rate": "(new_tokens - 1) / (mean latency - mean time to first token)",
            "roofline": "decode steps/s <= memory bandwidth / bytes of weights read per step; the bandwidth "
            "is the best of probes before, between and after the models; a share above 1 "
            "means the bound was mis-measured and is reported as null",
            "checks": "medians of batch-1 latency",
        },
        "machine": {
            **machine(),
            "memory_bandwidth_gbs": round(bandwidth.best / 1e9, 2),
            "memory_bandwidth_samples_gbs": bandwidth.summary()["samples"],
            "matvec_bandwidth_gbs": round(matvec.best / 1e9, 2),
            "matmul_gflops": round(max(rates.values()) / 1e9, 1),
            "matmul_gflops_by_dtype": {k: round(v / 1e9, 1) for k, v in rates.items()},
        },
        "rows": rows,
        "checks": checks,
        "original_pair_ratio_tinyllama_over_gpt2": ratio,
    }
    if out_path is not None:
        write_json_atomically(out_path, report)
    return report


JUDGE_TIERS = ("good", "terse", "wrong", "evasive")


def judge_speed(batches: tuple[int, ...] = (1, 8), prompts: int = 8, out: Path | None = None,
                dtype: str = "auto") -> dict:
    """The judge's cost per graded reply and per pairwise order at each batch size (replies read in one
    forward pass), on the validity ladder's replies of four tiers for its first ``prompts`` prompts
    and their good vs fluent-but-wrong pairs; every batch size grades the same replies afresh (the
    content cache is bypassed) and the grades are compared with batch 1's. JSON to ``out``."""
    from . import judge as J, validity
    from .hardware import cpu_summary
    from .store import ContentStore

    judge = J.LLMJudge(J.DEFAULT_JUDGE, dtype=dtype)
    judge.calibration()  # fitted or read before any clock starts
    by = {(r["id"], r["tier"]): r for r in validity.ladder()}
    ids = list(dict.fromkeys(i for i, _ in by))[:prompts]
    items = [(by[(i, t)]["prompt"], by[(i, t)]["reply"], None) for i in ids for t in JUDGE_TIERS]
    pairs = [(by[(i, "good")]["prompt"], by[(i, "good")]["reply"], by[(i, "wrong")]["reply"]) for i in ids]
    rows, first = [], None
    for batch in batches:
        judge.batch = batch
        judge.store = ContentStore(None, f"speed-{batch}")  # nothing kept: every reply computed
        judge.timing = {k: J.Timing() for k in judge.timing}
        start = time.perf_counter()
        grades = judge.grade_many(items)
        grade_seconds = time.perf_counter() - start
        start = time.perf_counter()
        verdicts = judge.compare_many(pairs)
        pair_seconds = time.perf_counter() - start
        t = judge.timing
        row = {"batch": batch, "replies": len(items), "pairs": len(pairs),
               "seconds_per_reply": round(grade_seconds / len(items), 3),
               "tokens_per_reply": round((t["grade"].tokens + t["correct"].tokens) / len(items), 1),
               "seconds_per_pair_order": round(pair_seconds / (2 * len(pairs)), 3),
               "tokens_per_pair_order": round(t["pair"].tokens / (2 * len(pairs)), 1),
               "tokens_per_second": round((t["grade"].tokens + t["correct"].tokens) / grade_seconds, 1)}
        if first is None:
            first = (grades, verdicts)
        else:
            row["max_grade_difference_vs_batch_1"] = round(max(
                abs(g[c] - f[c]) for g, f in zip(grades, first[0]) for c in (*J.CRITERIA, "correct")), 6)
            row["same_verdicts_as_batch_1"] = sum(v["verdict"] == f["verdict"] for v, f in zip(verdicts, first[1]))
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {"benchmark": "judge cost per graded reply and per pairwise order, by batch size",
              "judge": J.DEFAULT_JUDGE, "dtype": judge.dtype, "pair_dtype": judge.pair_dtype,
              "machine": {**machine(), **cpu_summary()}, "tiers": list(JUDGE_TIERS), "prompts": ids,
              "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"), "rows": rows}
    if out is not None:
        write_json_atomically(Path(out), report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("train", "_train-variant"):
        p = sub.add_parser(name)
        p.add_argument("--model", default="smollm2-135m")
        p.add_argument("--steps", type=int, default=12)
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--max-seq-len", type=int, default=256)
        p.add_argument("--data-dir", default=PROCESSED)
        p.add_argument("--random-init", action="store_true", help="random-weight stand-in (speed and memory only)")
        if name == "_train-variant":
            p.add_argument("--variant", choices=sorted(TRAIN_VARIANTS), required=True)
        else:
            p.add_argument("--variants", nargs="+", default=None, choices=sorted(TRAIN_VARIANTS),
                           help="default: all but repo-bf16, which runs only where the CPU has native bf16")
    for name in ("latency", "_latency-model"):
        p = sub.add_parser(name)
        p.add_argument("--new-tokens", type=int, default=32)
        p.add_argument("--repeats", type=int, default=2)
        p.add_argument("--dtype", default="auto" if name == "latency" else "fp32", choices=list(COMPUTE_DTYPES))
        if name == "latency":
            p.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
            p.add_argument("--random-models", nargs="*", default=["gpt2", "tinyllama"])
        else:
            p.add_argument("--model", required=True)
            p.add_argument("--random-init", action="store_true")
            p.add_argument("--adapter")
    p = sub.add_parser("decode", help="decode speed and token agreement, torch vs llama.cpp (utils.decode)")
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    p.add_argument("--models-dir", default=None, help="where <model>-lora adapters are (default: models/)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtype", default="auto", choices=list(COMPUTE_DTYPES), help="torch's dtype")
    p.add_argument("--train-steps", type=int, default=20, help="for models without a trained adapter")
    p.add_argument("--out", default=str(BENCH_DIR / "decode-latest.json"))
    p = sub.add_parser("judge", help="the judge's seconds and tokens per graded reply and pairwise order, by batch")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--prompts", type=int, default=8, help="ladder prompts (four replies and one pair each)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "int8"])
    p.add_argument("--out", default=str(BENCH_DIR / "judge_speed.json"))
    p = sub.add_parser("_decode-rate")
    p.add_argument("--model", required=True)
    p.add_argument("--engine", required=True)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--gguf")
    p.add_argument("--lora")
    p.add_argument("--adapter-root")
    args = parser.parse_args(argv)
    if args.command == "_decode-rate":
        from .decode import decode_rate

        print("RESULT " + json.dumps(decode_rate(args.model, args.engine, args.new_tokens, args.repeats, args.dtype,
                                                 args.gguf, args.lora, args.adapter_root)), flush=True)
        return 0
    if args.command == "judge":
        if any(b < 1 for b in args.batches) or args.prompts < 1:
            parser.error(f"--batches {args.batches} --prompts {args.prompts}: expected whole numbers of at least 1")
        judge_speed(tuple(args.batches), args.prompts, Path(args.out), args.dtype)
        return 0
    if args.command == "decode":
        from .decode import decode_benchmark

        report = decode_benchmark(args.models, args.models_dir, Path(args.out), args.new_tokens, args.repeats,
                                  args.dtype, args.train_steps)
        print(json.dumps({"targets": report["targets"], "rows": [
            {k: r[k] for k in ("model", "variant", "engine", "form", "decode_tokens_per_s", "roofline_fraction",
                               "token_agreement")} for r in report["rows"]]}, indent=2))
        return 0
    if args.command == "_latency-model":
        _latency_model(args)
        return 0
    if args.command == "latency":
        out = BENCH_DIR / "latency-latest.json"
        report = latency_benchmark(args.models, args.random_models, args.new_tokens, args.repeats, out_path=out,
                                   dtype=args.dtype)
        print(
            json.dumps(
                {"checks": report["checks"], "ratio": report["original_pair_ratio_tinyllama_over_gpt2"]}, indent=2
            )
        )
        return 0
    if args.command == "_train-variant":
        _train_variant(args)
        return 0
    report = train_benchmark(args.model, args.steps, args.batch_size, args.max_seq_len, args.data_dir, args.variants,
                             random_init=args.random_init)
    print(json.dumps({"summary": report["summary"], "targets_met": report["targets_met"],
                      "matmul_gflops": report["matmul_gflops"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
