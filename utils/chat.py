"""Turning conversations into model text, and the label mask for training on assistant
tokens only.

Two formats:
- ``template``: the tokenizer's own chat template (SmolLM2's ChatML, TinyLlama's Zephyr style).
- ``plain``: ``User: ...\\nAssistant: ...<eos>``, the original project's format, for models with no
  template (GPT-2, the Gemma 3 base model).

The mask is found by rendering growing prefixes of the conversation: the characters that the
assistant turn i adds to the text (its content and end-of-turn marker) are the ones trained on.
That works for any template whose rendering of a prefix is a prefix of the full rendering,
which ``assistant_spans`` checks rather than assumes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

IGNORE_INDEX = -100
_PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def chat_format(spec: dict, tokenizer) -> str:
    fmt = spec.get("chat_format", "auto")
    if fmt == "auto":
        return "template" if getattr(tokenizer, "chat_template", None) else "plain"
    if fmt == "template" and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"model {spec['name']!r} is configured with chat_format: template but its tokenizer has none")
    return fmt


def render(messages: list[dict], tokenizer, fmt: str, add_generation_prompt: bool = False) -> str:
    """Text of ``messages`` in the model's format; with ``add_generation_prompt`` it ends where
    the assistant's reply starts."""
    if fmt == "template":
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    eos = tokenizer.eos_token or ""
    parts = []
    for m in messages:
        text = f"{_PLAIN_ROLES[m['role']]}: {m['content']}"
        parts.append(text + eos if m["role"] == "assistant" else text)
    text = "\n".join(parts)
    if add_generation_prompt:
        text += ("\n" if parts else "") + "Assistant:"
    return text


def assistant_spans(messages: list[dict], tokenizer, fmt: str) -> tuple[str, list[tuple[int, int]]]:
    """Full text and the character spans of every assistant reply (with its end-of-turn marker)."""
    full = render(messages, tokenizer, fmt)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], tokenizer, fmt, add_generation_prompt=True)
        through = render(messages[: i + 1], tokenizer, fmt)
        if not (full.startswith(through) and through.startswith(before)):
            raise ValueError("chat format does not render conversation prefixes as text prefixes; "
                             "cannot locate assistant turns for the label mask")
        start = len(before)
        if fmt == "plain" and full[start:start + 1] == " ":
            start += 1  # the space after "Assistant:" belongs to the prompt
        spans.append((start, len(through)))
    return full, spans


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    prompt_tokens: int  # tokens before the first trained one


def encode(messages: list[dict], tokenizer, fmt: str, max_seq_len: int) -> Encoded | None:
    """Token ids and labels (assistant tokens only; everything else ``IGNORE_INDEX``), cut to
    ``max_seq_len``. None when not a single assistant token fits."""
    text, spans = assistant_spans(messages, tokenizer, fmt)
    enc = tokenizer(text, add_special_tokens=(fmt == "plain"), return_offsets_mapping=True)
    ids, labels = enc["input_ids"], []
    for tok, (a, b) in zip(ids, enc["offset_mapping"]):
        inside = b > a and any(a < e and b > s for s, e in spans)  # token overlaps a reply
        labels.append(tok if inside else IGNORE_INDEX)
    first = next((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), len(ids))
    ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    if all(lab == IGNORE_INDEX for lab in labels):
        return None
    return Encoded(ids, labels, first)


def encode_rows(rows: Sequence[dict], tokenizer, fmt: str, max_seq_len: int) -> tuple[list[dict], int]:
    """Encoded examples (input_ids, attention_mask, labels, length) of data rows, and how many
    did not fit (not a single reply token within ``max_seq_len``)."""
    out, dropped = [], 0
    for row in rows:
        enc = encode(row["messages"], tokenizer, fmt, max_seq_len)
        if enc is None:
            dropped += 1
            continue
        out.append({"input_ids": enc.input_ids, "attention_mask": [1] * len(enc.input_ids),
                    "labels": enc.labels, "length": len(enc.input_ids)})
    return out, dropped


def split_prompt(row: dict) -> tuple[list[dict], str, str]:
    """A data row as a prompt: the history up to its last assistant turn, the last user message
    in that history, and the assistant turn as the reference reply."""
    msgs = row["messages"]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    history = msgs[:last]
    user = next(m["content"] for m in reversed(history) if m["role"] == "user")
    return history, user, msgs[last]["content"]


def prompt_text(messages: list[dict], tokenizer, fmt: str) -> str:
    """The prompt for generating the next assistant turn (history up to the last user turn)."""
    history = messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages
    return render(history, tokenizer, fmt, add_generation_prompt=True)


def mask_preview(messages: list[dict], tokenizer, fmt: str, max_seq_len: int = 512) -> str:
    """The encoded text with the trained tokens in [[double brackets]], for eyeballing the mask."""
    enc = encode(messages, tokenizer, fmt, max_seq_len)
    if enc is None:
        return "(no assistant token fits)"
    out, inside = [], False
    for tok, lab in zip(enc.input_ids, enc.labels):
        trained = lab != IGNORE_INDEX
        if trained != inside:
            out.append("[[" if trained else "]]")
            inside = trained
        out.append(tokenizer.decode([tok]))
    return "".join(out) + ("]]" if inside else "")
