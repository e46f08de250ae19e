"""Tiny random GPT-2 and Llama models, built in the tests with the byte-level tokenizer, saved
as local folders so they go through the same loading code as the real presets."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

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
