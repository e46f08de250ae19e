"""Tiny random GPT-2 and Llama models, built in the tests with the byte-level tokenizer, saved
as local folders so they go through the same loading code as the real presets."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, TrainerCallback

from utils.models import byte_tokenizer

VOCAB = 260  # 256 bytes + 2 specials, rounded up
# Larger than the usual 0.02, so that a 32-wide model can express sharp next-token
# distributions at all and a few LoRA steps visibly lower the loss.
INIT = 0.3


def tiny_config(arch: str):
    if arch == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_positions=256, n_embd=32, n_layer=2, n_head=2,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=256, eos_token_id=256,
                          initializer_range=INIT)
    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       bos_token_id=256, eos_token_id=256, tie_word_embeddings=False, initializer_range=INIT)


class Interrupt(TrainerCallback):
    """A Trainer callback that stops training right after optimizer step ``at`` (before that step's
    checkpoint, if any), as a kill would."""

    def __init__(self, at):
        self.at = at

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.at:
            raise KeyboardInterrupt("simulated kill")


def save_tiny_model(folder: Path, arch: str, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch))
    model.save_pretrained(folder, safe_serialization=True)
    tok = byte_tokenizer()
    tok.save_pretrained(folder)
    return folder


def write_splits(folder: Path, n_train: int = 24, n_val: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    words = ["cat", "dog", "sun", "tree", "moon", "bird"]
    for split, n, off in (("train", n_train, 0), ("validation", n_val, 1000), ("test", n_val, 2000)):
        with open(folder / f"{split}.jsonl", "w") as fh:
            for i in range(n):
                w = words[i % len(words)]
                rec = {"id": f"{split}{i}", "source": "tiny", "messages": [
                    {"role": "user", "content": f"say {w} {i + off}"},
                    {"role": "assistant", "content": f"{w} {w} {w}"}]}
                fh.write(json.dumps(rec) + "\n")
    return folder


def fake_lora_run(tmp_path, smollm2, rank=4, alpha=8, targets=("q_proj", "v_proj"), seed=0, sha=None, extra=None,
                  std=0.05):
    """A SmolLM2 training output folder (run.json + final/) whose LoRA A and B are random and non-zero,
    so that it changes the outputs. ``smollm2``: {"hf": dequantised weights, "sha256": the GGUF's}."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    root = tmp_path / "smollm2-135m-lora"
    final = root / "final"
    final.mkdir(parents=True)
    tensors = {}
    for layer in (0, 7):
        for module in targets:
            out = smollm2["hf"][f"model.layers.{layer}.self_attn.{module}.weight"].shape[0]
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{key}.lora_A.weight"] = rng.normal(0, std, (rank, 576)).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = rng.normal(0, std, (out, rank)).astype(np.float32)
    save_file(tensors, str(final / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(targets),
              "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", **(extra or {})}
    (final / "adapter_config.json").write_text(json.dumps(config))
    (root / "run.json").write_text(json.dumps({"config": {"model": "smollm2-135m"}, "random_init": False,
                                               "gguf_sha256": sha or smollm2["sha256"]}))
    return root, tensors
