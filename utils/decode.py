"""Decode speed on both engines, and whether they give the same answers.

    python -m utils.benchmark decode --out reports/benchmarks/decode-latest.json

For each model (default: the two GGUF-shipped presets) and each of its variants (``base``: the
shipped weights; ``lora``: the trained adapter, ``models/<model>-lora``, or one trained for the
benchmark where the pipeline has not made one), the benchmark measures greedy batch-1 decode on
``torch`` (fp32 or bf16, the adapter merged) and on ``llama.cpp`` (the shipped GGUF; the adapter
either applied at run time from ``lora.gguf`` or merged into a Q8_0 GGUF, see ``utils.export``).

Token agreement (llama.cpp vs torch on the same weights): llama.cpp decodes 32 tokens greedily for
each of 20 prompts of the domain suite; torch then reads the prompt plus llama.cpp's tokens in one
forward pass, and a token agrees where it is torch's own greedy choice at that position (teacher
forcing: one early disagreement does not turn the rest of the reply into disagreements). Each
disagreement is reported with torch's logit margin between its choice and llama.cpp's: llama.cpp
multiplies quantised weights with 8-bit-quantised activations, torch the same weights dequantised
in fp32, so logits differ by a little and near-ties (margin < ``NEAR_TIE``) can flip. A larger
margin means the two engines compute different functions: a bug.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from .paths import from_root, has_adapter, shown

NEAR_TIE = 1.0  # logits; see the module docstring
AGREEMENT_PROMPTS, AGREEMENT_TOKENS = 20, 32


def agreement_prompts(n: int = AGREEMENT_PROMPTS) -> list[str]:
    from .suite import load_domain_suite

    return [item["prompt"] for item in load_domain_suite()][:n]


def gguf_bytes_per_token(*paths: Path) -> int:
    """Bytes of tensors a decode step reads from these GGUF files: all of them, except the token
    embedding table where the model has a separate output matrix (one row of it is read)."""
    import gguf

    total = 0
    for path in paths:
        tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors}
        if "output.weight" in tensors:
            tensors.pop("token_embd.weight", None)
        total += sum(tensors.values())
    return total


def teacher_forced(model, prompt: list[int], tokens: list[int]) -> dict:
    """Where ``tokens`` (another engine's greedy reply) are this model's own greedy choices, and the
    logit margin by which it preferred its own token where they are not."""
    import torch

    if not tokens:
        return {"n": 0, "agree": 0, "first_divergence": None, "disagreements": []}
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1].float()
    choice = logits.argmax(-1).tolist()
    disagreements = []
    for i, (ours, theirs) in enumerate(zip(choice, tokens)):
        if ours != theirs:
            margin = float(logits[i, ours] - logits[i, theirs])
            rank = int((logits[i] > logits[i, theirs]).sum())
            disagreements.append({"position": i, "torch_token": ours, "llama_token": theirs,
                                  "margin": round(margin, 4), "llama_token_rank_in_torch": rank,
                                  "near_tie": margin < NEAR_TIE})
    return {"n": len(tokens), "agree": len(tokens) - len(disagreements),
            "first_divergence": disagreements[0]["position"] if disagreements else None,
            "disagreements": disagreements}


def token_agreement(llama, torch_model, prompts_ids: list[list[int]], new_tokens: int = AGREEMENT_TOKENS) -> dict:
    per_prompt = []
    for ids in prompts_ids:
        done = llama.complete(ids, new_tokens)
        per_prompt.append(teacher_forced(torch_model, ids, done.token_ids))
    n = sum(p["n"] for p in per_prompt)
    agree = sum(p["agree"] for p in per_prompt)
    flips = [d for p in per_prompt for d in p["disagreements"]]
    return {"prompts": len(per_prompt), "tokens": n, "agreement": agree / n if n else None,
            "prompts_identical": sum(p["first_divergence"] is None for p in per_prompt),
            "disagreements": len(flips), "near_ties": sum(d["near_tie"] for d in flips),
            "max_margin": max((d["margin"] for d in flips), default=None),
            "first_divergence": next(({"prompt": i, **p["disagreements"][0]} for i, p in enumerate(per_prompt)
                                      if p["disagreements"]), None),
            "per_prompt": [{"n": p["n"], "agree": p["agree"], "first_divergence": p["first_divergence"]}
                           for p in per_prompt]}


def llama_decode_rate(llama, prompts_ids: list[list[int]], new_tokens: int, repeats: int) -> dict:
    """llama.cpp's own decode timing (prompt processing excluded), fixed length, after a warm-up."""
    llama.complete(prompts_ids[0], new_tokens, fixed_length=True)
    rates, lat = [], []
    for _ in range(repeats):
        for ids in prompts_ids:
            done = llama.complete(ids, new_tokens, fixed_length=True)
            if len(done.token_ids) != new_tokens:
                raise RuntimeError(f"llama.cpp generated {len(done.token_ids)} tokens, {new_tokens} were asked")
            rates.append(done.decode_tokens_per_s)
            lat.append(done.seconds)
    import numpy as np

    return {"decode_tokens_per_s": float(np.median(rates)), "decode_rates": [round(r, 2) for r in rates],
            "latency_median_s": float(np.median(lat)), "n": len(rates), "new_tokens": new_tokens}


def torch_decode_rate(model, tokenizer, prompts_ids: list[list[int]], new_tokens: int, repeats: int) -> dict:
    from .roofline import measure_variant

    res = measure_variant(model, tokenizer, prompts_ids, new_tokens, repeats)
    return {"decode_tokens_per_s": res["decode_tokens_per_s"], "latency_median_s": res["latency_median_s"],
            "n": res["n"], "new_tokens": new_tokens}


def quick_adapter(model: str, steps: int, out_dir: Path) -> Path:
    """A short LoRA run for models the pipeline has not trained (speed and agreement need an
    adapter that changes the outputs, not a trained one)."""
    from .training import TrainConfig, train

    cfg = TrainConfig(model=model, output_dir=str(out_dir), max_steps=steps, eval_steps=steps, save_steps=steps,
                      load_in_8bit=False, learning_rate=2e-3, max_train_examples=256, max_eval_examples=16)
    train(cfg, log=lambda *a: print(*a, file=sys.stderr, flush=True))
    return out_dir


def _rate_in_subprocess(model: str, engine_name: str, form: str, new_tokens: int, repeats: int, dtype: str,
                       gguf: Path | None = None, lora: Path | None = None, adapter_root: Path | None = None) -> dict:
    """One decode-rate measurement in a fresh process: torch's and llama.cpp's OpenMP threads keep
    spinning for a while after each call, and two runtimes in one process slow each other down."""
    import subprocess

    cmd = [sys.executable, "-m", "utils.benchmark", "_decode-rate", "--model", model, "--engine", engine_name,
           "--new-tokens", str(new_tokens), "--repeats", str(repeats), "--dtype", dtype]
    for flag, value in (("--gguf", gguf), ("--lora", lora), ("--adapter-root", adapter_root)):
        if value is not None:
            cmd += [flag, str(value)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"decode rate of {model} on {engine_name} ({form}) failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def decode_rate(model: str, engine_name: str, new_tokens: int, repeats: int, dtype: str = "fp32",
                gguf: str | None = None, lora: str | None = None, adapter_root: str | None = None) -> dict:
    """The body of ``_decode-rate``: greedy decode rate over three suite prompts."""
    import torch

    from . import chat, engine, models
    from .generation import prompt_ids

    tok = models.load_tokenizer(model)
    spec = models.resolve(model)
    fmt = chat.chat_format(spec, tok)
    ids = [prompt_ids(tok, [{"role": "user", "content": p}], fmt) for p in agreement_prompts(3)]
    if engine_name == "llama.cpp":
        return llama_decode_rate(engine.LlamaCppModel(gguf, lora=lora), ids, new_tokens, repeats)
    loaded = models.load_finetuned(adapter_root, merge=True) if adapter_root else models.load_model(model)
    net = loaded.model.eval()
    if dtype == "bf16":
        net = net.to(torch.bfloat16)
    from .roofline import weight_bytes_read_per_token

    return {**torch_decode_rate(net, loaded.tokenizer, ids, new_tokens, repeats),
            "bytes_per_token": weight_bytes_read_per_token(net)}


def decode_model(model: str, adapter_root: Path | None, new_tokens: int = 32, repeats: int = 2,
                 dtype: str = "auto", train_steps: int = 20, n_prompts: int = AGREEMENT_PROMPTS) -> dict:
    """Rows for one model: {torch, llama.cpp} x {base, lora}, plus llama.cpp's merged form (roofline
    shares are added by ``decode_benchmark``, against the best bandwidth probe of the whole run)."""
    import gc

    from . import chat, engine, export, models
    from .generation import prompt_ids
    from .hardware import pick_dtype

    dtype = pick_dtype(dtype, "the decode benchmark")
    spec = models.resolve(model)
    adapter_note = "trained adapter (pipeline)"
    tmp = None
    if adapter_root is None or not has_adapter(adapter_root):
        tmp = tempfile.TemporaryDirectory(prefix=f"decode-{spec['name']}-")
        adapter_root = quick_adapter(model, train_steps, Path(tmp.name) / "lora")
        adapter_note = f"trained for this benchmark ({train_steps} steps)"
    adapter_root = Path(adapter_root)
    exported = export.export(adapter_root, Path(tmp.name) / "gguf" if tmp else adapter_root / "gguf")
    base_gguf = models.gguf_path(spec)
    lora_gguf, merged_gguf = Path(exported["lora"]), Path(exported["merged"])
    merged_form = f"merged {exported['merged_type']}"

    variants = [  # (variant, engine, form, files read per token, rate measurement)
        ("base", "llama.cpp", "shipped", (base_gguf,), {"gguf": base_gguf}),
        ("base", "torch", "dequantised", None, {}),
        ("lora", "llama.cpp", "adapter", (base_gguf, lora_gguf), {"gguf": base_gguf, "lora": lora_gguf}),
        ("lora", "llama.cpp", merged_form, (merged_gguf,), {"gguf": merged_gguf}),
        ("lora", "torch", "merged", None, {"adapter_root": adapter_root}),
    ]
    rows = []
    for variant, eng, form, files, kw in variants:
        rate = _rate_in_subprocess(model, eng, form, new_tokens, repeats, dtype, **kw)
        nbytes = gguf_bytes_per_token(*files) if files else rate.pop("bytes_per_token")
        rows.append({"model": spec["name"], "variant": variant, "engine": eng, "form": form,
                     "dtype": dtype if eng == "torch" else "gguf", **rate, "bytes_per_token": nbytes,
                     "token_agreement": None, "agreement": None,
                     **({"files": [shown(f) for f in files]} if files else {}),
                     **({"adapter": adapter_note} if variant == "lora" else {})})
        print(f"  {spec['name']} {variant} {eng} {form}: {rate['decode_tokens_per_s']:.1f} tok/s", file=sys.stderr,
              flush=True)

    # agreement (untimed): llama.cpp's greedy tokens read by torch fp32 on the same weights
    prompts = agreement_prompts(n_prompts)
    for variant in ("base", "lora"):
        loaded = models.load_model(model) if variant == "base" else models.load_finetuned(adapter_root, merge=True)
        net, tok = loaded.model.eval(), loaded.tokenizer
        fmt = chat.chat_format(loaded.spec, tok)
        ids = [prompt_ids(tok, [{"role": "user", "content": p}], fmt) for p in prompts]
        for r in rows:
            if r["variant"] == variant and r["engine"] == "llama.cpp":
                files = [from_root(f) for f in r["files"]]
                llama = engine.LlamaCppModel(files[0], lora=files[1] if len(files) > 1 else None)
                r["agreement"] = token_agreement(llama, net, ids)
                r["token_agreement"] = r["agreement"]["agreement"]
                llama.close()
                print(f"  {spec['name']} {variant} llama.cpp {r['form']}: agreement {r['token_agreement']:.3f} "
                      f"({r['agreement']['near_ties']} of {r['agreement']['disagreements']} disagreements near ties)",
                      file=sys.stderr, flush=True)
        del net, loaded
        gc.collect()
    if tmp:
        tmp.cleanup()
    return {"model": spec["name"], "adapter": adapter_note, "rows": rows}


def decode_benchmark(models_list: list[str], models_dir: Path | None = None, out_path: Path | None = None,
                     new_tokens: int = 32, repeats: int = 2, dtype: str = "auto", train_steps: int = 20,
                     n_prompts: int = AGREEMENT_PROMPTS) -> dict:
    """Every model's rows (see ``decode_model``), the run's bandwidth bound, and the targets:
    fine-tuned on llama.cpp at >= 1.0x the shipped base GGUF's decode rate on llama.cpp."""
    from tqdm.auto import tqdm

    from . import models
    from .roofline import Bound, memory_bandwidth
    from .system import machine
    from .io import write_json_atomically
    from .paths import MODELS, from_root

    models_dir = from_root(models_dir or MODELS)
    bandwidth = Bound(memory_bandwidth, "GB/s")
    bandwidth.sample()
    start = time.perf_counter()
    per_model, skipped = [], {}
    for model in list(models_list):
        spec = models.resolve(model)
        if spec.get("source") != "gguf":
            skipped[spec["name"]] = f"source {spec.get('source')!r}: no shipped GGUF for llama.cpp"
    for model in tqdm([m for m in models_list if models.resolve(m)["name"] not in skipped], desc="decode benchmark"):
        bandwidth.sample()
        adapter = models.adapter_dir(model, models_dir)
        per_model.append(decode_model(model, adapter, new_tokens, repeats, dtype, train_steps, n_prompts))
    bandwidth.sample()
    rows = [r for m in per_model for r in m["rows"]]
    from .roofline import share_of_bound

    for r in rows:  # every share against the best probe of the whole run
        r["roofline_tokens_per_s"] = bandwidth.best / r["bytes_per_token"]
        r["roofline_fraction"] = share_of_bound(r["decode_tokens_per_s"], r["roofline_tokens_per_s"])

    def rate(model, variant, eng, form=None):
        return next((r["decode_tokens_per_s"] for r in rows if r["model"] == model and r["variant"] == variant
                     and r["engine"] == eng and (form is None or r["form"] == form)), None)

    targets = {}
    for m in per_model:
        name = m["model"]
        base = rate(name, "base", "llama.cpp")
        lora_best = max(r["decode_tokens_per_s"] for r in rows
                        if r["model"] == name and r["variant"] == "lora" and r["engine"] == "llama.cpp")
        torch_lora = rate(name, "lora", "torch")
        targets[name] = {
            "lora_llama_cpp_vs_base_llama_cpp": lora_best / base,
            "lora_llama_cpp_vs_lora_torch": lora_best / torch_lora,
            "target_lora_at_least_base_rate": lora_best / base >= 1.0,
        }
    report = {
        "schema": 1, "benchmark": "decode",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - start, 1),
        "method": {"new_tokens": new_tokens, "repeats": repeats, "decoding": "greedy, batch 1, fixed length",
                   "timing_prompts": 3, "agreement": f"{n_prompts} domain-suite prompts x {AGREEMENT_TOKENS} "
                   f"tokens, teacher-forced; near tie: torch logit margin < {NEAR_TIE}",
                   "llama_cpp_rate": "llama.cpp's own decode timing (prompt excluded), median",
                   "torch_rate": "(new_tokens - 1) / (mean latency - mean time to first token)",
                   "roofline": "decode tokens/s <= memory bandwidth / bytes of weights read per token (best "
                               "bandwidth probe of the run; a share above 1 is reported as null)"},
        "machine": {**machine(), "memory_bandwidth_gbs": round(bandwidth.best / 1e9, 2),
                    "memory_bandwidth_samples_gbs": bandwidth.summary()["samples"]},
        "rows": rows, "targets": targets, "skipped": skipped,
    }
    if out_path is not None:
        write_json_atomically(out_path, report)
    return report


def table(report: dict):
    """The rows as a DataFrame, for notebooks and the report."""
    import pandas as pd

    from .roofline import share_text

    return pd.DataFrame([{
        "model": r["model"], "variant": r["variant"], "engine": r["engine"], "form": r["form"],
        "decode tok/s": round(r["decode_tokens_per_s"], 1), "of roofline": share_text(r["roofline_fraction"]),
        "MB read/token": round(r["bytes_per_token"] / 2**20, 1),
        "token agreement": "" if r["token_agreement"] is None else f"{100 * r['token_agreement']:.1f}%",
        "disagreements (near ties)": "" if r["agreement"] is None else
        f"{r['agreement']['disagreements']} ({r['agreement']['near_ties']})"} for r in report["rows"]])
