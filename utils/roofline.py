"""What a decode step can reach on this machine and how fast it goes: memory-bandwidth probes (a
decode step at batch 1 streams every weight once), the weight bytes a step reads, shares of a bound
that refuse to exceed it, and the timed generations the latency figures come from. Used by both
``benchmark`` (torch latency) and ``decode`` (torch against llama.cpp), which therefore need not
import each other (imports flow one way)."""
from __future__ import annotations

import time


def matvec_bandwidth(gib: float = 0.5, repeats: int = 5) -> float:
    """Bytes/s that a large fp32 matrix-vector product streams (the access pattern of a decode
    step at batch 1): usually below ``memory_bandwidth``, which sums a tensor."""
    import torch

    n = int((gib * 2**30 / 4) ** 0.5)
    w, x = torch.randn(n, n), torch.randn(n)
    w @ x
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        w @ x
        best = min(best, time.perf_counter() - start)
    return n * n * 4 / best


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


class Bound:
    """A machine limit probed several times over a run (best of all probes): one probe taken while
    something else held the cores or the memory bus reads low, and every share of it reads high."""

    def __init__(self, probe, unit: str):
        self.probe, self.unit, self.samples = probe, unit, []

    def sample(self) -> float:
        self.samples.append(self.probe())
        return self.best

    @property
    def best(self) -> float:
        return max(self.samples)

    def summary(self, scale: float = 1e9) -> dict:
        return {"best": round(self.best / scale, 2), "samples": [round(x / scale, 2) for x in self.samples],
                "unit": self.unit}


def share_of_bound(rate: float, bound: float) -> float | None:
    """``rate / bound``, or None where it exceeds 1: a bound that something beat was mis-measured,
    and such a share is never reported as a result."""
    share = rate / bound
    return share if share <= 1.0 else None


def share_text(share: float | None) -> str:
    return "n/a (bound mis-measured)" if share is None else f"{100 * share:.0f}%"


def weight_bytes_read_per_token(model) -> int:
    """Bytes of weights a decode step reads: every parameter and buffer of the layers, except an
    input embedding table that is not also the output layer (only one row of it is read)."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    skip = set()
    if inp is not None and (out is None or out.weight.data_ptr() != inp.weight.data_ptr()):
        skip.add(inp.weight.data_ptr())
    seen, total = set(), 0
    for p in list(model.parameters()):
        ptr = p.data_ptr()
        if ptr in seen or ptr in skip:
            continue
        seen.add(ptr)
        total += p.numel() * p.element_size()
    return total


def measure_variant(model, tokenizer, ids: list[list[int]], new_tokens: int, repeats: int, batch: int = 1) -> dict:
    """Warm-up, then ``repeats`` timed generations of exactly ``new_tokens`` per prompt; time to
    first token from separate 1-token generations."""
    from .generation import time_generation

    for _ in range(2):  # warm-up at full length (allocations, first-call paths, caches)
        time_generation(model, tokenizer, ids[0], new_tokens, batch)
    lat, ttft = [], []
    for _ in range(repeats):
        for prompt in ids:
            ttft.append(time_generation(model, tokenizer, prompt, 1, batch))
            lat.append(time_generation(model, tokenizer, prompt, new_tokens, batch))
    import numpy as np

    lat_a, ttft_a = np.array(lat), np.array(ttft)
    decode_s = max(float(lat_a.mean() - ttft_a.mean()), 1e-9)
    return {
        "batch": batch, "new_tokens": new_tokens, "n": len(lat),
        "latency_mean_s": float(lat_a.mean()), "latency_median_s": float(np.median(lat_a)),
        "latency_p95_s": float(np.quantile(lat_a, 0.95)), "latencies_s": [round(x, 4) for x in lat],
        "ttft_mean_s": float(ttft_a.mean()), "ttft_median_s": float(np.median(ttft_a)),
        "decode_tokens_per_s": (new_tokens - 1) * batch / decode_s,
        "decode_steps_per_s": (new_tokens - 1) / decode_s,
    }
