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
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from .io import write_json_atomically
from .paths import REPORTS_DIR

BENCH_DIR = REPORTS_DIR / "benchmarks"


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available(), "python": platform.python_version()}


def matmul_flops(n: int = 2048, repeats: int = 10) -> float:
    """Best fp32 matrix-multiply rate (FLOP/s) of this process's torch threads."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def memory_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Best read bandwidth (bytes/s): summing a tensor larger than every cache."""
    import torch

    x = torch.ones(int(gib * 2**30 / 4))
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


# --------------------------------------------------------------------------- training throughput

TRAIN_VARIANTS = {
    "repo-fp32": {"padding": "dynamic", "load_in_8bit": False},
    "tutorial-fp32": {"padding": "max_length", "load_in_8bit": False},
    "repo-8bit": {"padding": "dynamic", "load_in_8bit": True},
    "tutorial-8bit": {"padding": "max_length", "load_in_8bit": True},
}


def _train_variant(args: argparse.Namespace) -> None:
    """One variant, in a fresh process: prints its figures as one JSON line."""
    from .training import TrainConfig, private_rss_mb, train

    variant = TRAIN_VARIANTS[args.variant]
    baseline = private_rss_mb()
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(model=args.model, data_dir=args.data_dir, output_dir=out, max_steps=args.steps,
                          eval_steps=args.steps, save_steps=args.steps, batch_size=args.batch_size,
                          max_seq_len=args.max_seq_len, max_eval_examples=8, resume=False, seed=0, **variant)
        run = train(cfg, log=lambda *a: None).run
    print("RESULT " + json.dumps({
        "variant": args.variant, **variant,
        "tokens": run["train_tokens"], "step_time_s": run["train_step_time_s"],
        "tokens_per_s": run["train_tokens_per_s"], "total_params": run["total_params"],
        "trainable_params": run["trainable_params"], "load_in_8bit_used": run["load_in_8bit"],
        "model_memory_mb": run["model_memory_mb"], "peak_rss_mb": run["peak_rss_mb"],
        "peak_private_rss_mb": run["peak_private_rss_mb"], "baseline_private_rss_mb": round(baseline, 1),
        "peak_private_rss_delta_mb": round(run["peak_private_rss_mb"] - baseline, 1),
    }), flush=True)


def train_benchmark(model: str = "smollm2-135m", steps: int = 12, batch_size: int = 8, max_seq_len: int = 256,
                    data_dir: str = "data/processed", variants=tuple(TRAIN_VARIANTS), out_dir: Path = BENCH_DIR) -> dict:
    from tqdm.auto import tqdm

    results = {}
    for name in tqdm(variants, desc="training variants"):
        cmd = [sys.executable, "-m", "utils.benchmark", "_train-variant", "--variant", name, "--model", model,
               "--steps", str(steps), "--batch-size", str(batch_size), "--max-seq-len", str(max_seq_len),
               "--data-dir", data_dir]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"variant {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        results[name] = json.loads(line[len("RESULT "):])

    flops = matmul_flops()
    for r in results.values():
        r["compute_fraction"] = round(4 * r["total_params"] * r["tokens_per_s"] / flops, 3)

    def ratio(a, b, key):
        return round(results[a][key] / results[b][key], 3) if a in results and b in results else None

    summary = {
        "speedup_vs_tutorial_fp32": ratio("repo-fp32", "tutorial-fp32", "tokens_per_s"),
        "speedup_vs_tutorial_8bit": ratio("repo-8bit", "tutorial-8bit", "tokens_per_s"),
        "compute_fraction_repo_fp32": results.get("repo-fp32", {}).get("compute_fraction"),
        "compute_fraction_repo_8bit": results.get("repo-8bit", {}).get("compute_fraction"),
        "model_memory_ratio_8bit_vs_fp32": ratio("repo-8bit", "repo-fp32", "model_memory_mb"),
        "peak_private_rss_ratio_8bit_vs_fp32": ratio("repo-8bit", "repo-fp32", "peak_private_rss_mb"),
        "peak_rss_ratio_8bit_vs_fp32": ratio("repo-8bit", "repo-fp32", "peak_rss_mb"),
    }
    targets = {
        "speedup_vs_tutorial >= 2": (summary["speedup_vs_tutorial_fp32"] or 0) >= 2,
        "compute_fraction >= 0.5": (summary["compute_fraction_repo_fp32"] or 0) >= 0.5,
        "8bit peak memory <= 0.6x (private RSS)": (summary["peak_private_rss_ratio_8bit_vs_fp32"] or 9) <= 0.6,
        "8bit model memory <= 0.6x": (summary["model_memory_ratio_8bit_vs_fp32"] or 9) <= 0.6,
    }
    report = {
        "schema": 1, "benchmark": "train_throughput",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {"model": model, "steps": steps, "batch_size": batch_size, "max_seq_len": max_seq_len,
                     "data_dir": data_dir, "tokens": "non-padding tokens per second of optimizer-step time"},
        "machine": machine(), "matmul_gflops": round(flops / 1e9, 1),
        "variants": results, "summary": summary, "targets_met": targets,
    }
    out_dir = Path(out_dir)
    stamp = report["when"].replace(":", "").replace("-", "")[:15]
    write_json_atomically(out_dir / f"train_throughput-{stamp}.json", report)
    write_json_atomically(out_dir / "train_throughput-latest.json", report)
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
        p.add_argument("--data-dir", default="data/processed")
        if name == "_train-variant":
            p.add_argument("--variant", choices=sorted(TRAIN_VARIANTS), required=True)
        else:
            p.add_argument("--variants", nargs="+", default=list(TRAIN_VARIANTS), choices=sorted(TRAIN_VARIANTS))
    args = parser.parse_args(argv)
    if args.command == "_train-variant":
        _train_variant(args)
        return 0
    report = train_benchmark(args.model, args.steps, args.batch_size, args.max_seq_len, args.data_dir, args.variants)
    print(json.dumps({"summary": report["summary"], "targets_met": report["targets_met"],
                      "matmul_gflops": report["matmul_gflops"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
