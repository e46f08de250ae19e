"""Generation: batched greedy generation for evaluation, single-prompt timing for benchmarks,
and streaming for the dashboard. One model object per (model, adapter) pair: adapters are
merged or attached once, never switched under a running generation.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

from . import chat
from .limits import REPLY_TOKENS


@dataclass
class Generated:
    text: str
    new_tokens: int
    latency_s: float  # wall time of the call that produced it (a batch's time, shared by its members)
    batch_size: int
    truncated: bool = False  # stopped by max_new_tokens, not by an end-of-turn token: cut mid-reply


def prompt_ids(tokenizer, messages: Sequence[dict], fmt: str, max_prompt_tokens: int | None = None) -> list[int]:
    """Token ids of the generation prompt; cut from the left to ``max_prompt_tokens`` (the most
    recent turns are kept)."""
    text = chat.prompt_text(list(messages), tokenizer, fmt)
    ids = tokenizer(text, add_special_tokens=(fmt == "plain"))["input_ids"]
    if max_prompt_tokens and len(ids) > max_prompt_tokens:
        ids = ids[-max_prompt_tokens:]
    return ids


def stop_token_ids(tokenizer, model) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


# In the plain format a model that has not learnt to stop (a base model) goes on to write the
# user's next turn; a chat harness stops there, and so do we.
PLAIN_STOP = "\nUser:"
# Sampling draws from torch's one global generator, and generate() takes no generator of its own:
# two sampled generations at once (different models, so different per-model locks) would interleave
# their draws and neither would be reproducible from its seed. Sampled generations take this lock.
_SAMPLING = threading.Lock()


def _gen_kwargs(tokenizer, model, max_new_tokens: int, min_new_tokens: int = 0, do_sample: bool = False,
                temperature: float = 1.0, top_p: float = 1.0, fmt: str | None = None) -> dict:
    kw = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "pad_token_id": tokenizer.pad_token_id,
          "eos_token_id": stop_token_ids(tokenizer, model)}
    if fmt == "plain":
        kw.update(stop_strings=[PLAIN_STOP], tokenizer=tokenizer)
    if min_new_tokens:
        kw["min_new_tokens"] = min_new_tokens
    if do_sample:
        kw.update(temperature=temperature, top_p=top_p)
    else:  # plain greedy: no sampling knobs that would trigger warnings
        kw.update(temperature=None, top_p=None, top_k=None)
    return kw


def generate_batch(model, tokenizer, conversations: Sequence[Sequence[dict]], fmt: str,
                   max_new_tokens: int = REPLY_TOKENS["evaluation"],
                   batch_size: int = 8, min_new_tokens: int = 0, max_prompt_tokens: int = 768,
                   progress: bool = True, sample: dict | None = None) -> list[Generated]:
    """Replies to the last user turn of each conversation, generated in left-padded batches: greedy,
    or sampled with ``sample`` = {"temperature", "top_p", "seed"} (torch's generator seeded once, under
    the sampling lock, so the same seed gives the same replies)."""
    import contextlib

    import torch

    with _SAMPLING if sample else contextlib.nullcontext():
        if sample:
            torch.manual_seed(int(sample.get("seed", 0)))
        return _generate_batches(model, tokenizer, conversations, fmt, max_new_tokens, batch_size, min_new_tokens,
                                 max_prompt_tokens, progress, sample)


def _generate_batches(model, tokenizer, conversations, fmt, max_new_tokens, batch_size, min_new_tokens,
                      max_prompt_tokens, progress, sample) -> list[Generated]:
    import torch
    from tqdm.auto import tqdm

    knobs = {"do_sample": True, "temperature": sample.get("temperature", 1.0),
             "top_p": sample.get("top_p", 1.0)} if sample else {}

    order = sorted(range(len(conversations)), key=lambda i: len(conversations[i][-1]["content"]))
    results: dict[int, Generated] = {}
    pad = tokenizer.pad_token_id
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="generating", disable=not progress, leave=False):
        ids = [prompt_ids(tokenizer, conversations[i], fmt, max_prompt_tokens) for i in batch]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
        attention = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        start = time.perf_counter()
        with torch.inference_mode():
            gen = model.generate(input_ids=input_ids, attention_mask=attention,
                                 **_gen_kwargs(tokenizer, model, max_new_tokens, min_new_tokens, fmt=fmt, **knobs))
        seconds = time.perf_counter() - start
        stops = set(stop_token_ids(tokenizer, model)) | {pad}
        for row, i in enumerate(batch):
            new = gen[row, width:].tolist()
            n = next((k for k, t in enumerate(new) if t in stops), len(new))
            text = tokenizer.decode(new[:n], skip_special_tokens=True).split(PLAIN_STOP)[0].strip()
            results[i] = Generated(text, n, seconds, len(batch), truncated=n == max_new_tokens)
    return [results[i] for i in range(len(conversations))]


def time_generation(model, tokenizer, ids: list[int], new_tokens: int, batch: int = 1) -> float:
    """Wall time of generating exactly ``new_tokens`` tokens (min = max) for ``batch`` copies of a prompt."""
    import torch

    input_ids = torch.tensor([ids] * batch)
    kw = _gen_kwargs(tokenizer, model, new_tokens, min_new_tokens=new_tokens)
    kw["eos_token_id"] = None  # fixed length: stopping early would change what is measured
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kw)
    seconds = time.perf_counter() - start
    assert out.shape[1] - input_ids.shape[1] == new_tokens, "generation length was not fixed"
    return seconds


def stream(model, tokenizer, messages: Sequence[dict], fmt: str, max_new_tokens: int = REPLY_TOKENS["dashboard"],
           do_sample: bool = False,
           temperature: float = 0.7, top_p: float = 0.9, seed: int | None = None,
           max_prompt_tokens: int = 768, lock: threading.Lock | None = None, info: dict | None = None) -> Iterator[str]:
    """Yield the reply's text piece by piece as it is generated (for the dashboard). ``info``
    receives ``new_tokens`` (generated token count), ``prompt_tokens`` and ``truncated``
    (the prompt was cut from the left to ``max_prompt_tokens``)."""
    import torch
    from transformers import TextIteratorStreamer

    class CountingStreamer(TextIteratorStreamer):
        new_tokens = 0

        def put(self, value):
            if not (self.skip_prompt and self.next_tokens_are_prompt):
                self.new_tokens += int(value.numel())
            super().put(value)

    full = len(prompt_ids(tokenizer, messages, fmt, None))
    ids = prompt_ids(tokenizer, messages, fmt, max_prompt_tokens)
    if info is not None:
        info.update(prompt_tokens=len(ids), truncated=full > len(ids))
    streamer = CountingStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kw = _gen_kwargs(tokenizer, model, max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
                     fmt=fmt)
    input_ids = torch.tensor([ids])
    errors: list[BaseException] = []

    def work():
        try:
            locks = [x for x in (lock, _SAMPLING if do_sample else None) if x is not None]
            for x in locks:
                x.acquire()
            try:
                if seed is not None:
                    torch.manual_seed(seed)
                with torch.inference_mode():
                    model.generate(
                        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer, **kw
                    )
            finally:
                for x in reversed(locks):
                    x.release()
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(err)
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    if fmt == "plain":  # hold back what could be the start of the stop string
        pending, keep = "", len(PLAIN_STOP) - 1
        for piece in streamer:
            pending += piece
            if PLAIN_STOP in pending:
                yield pending.split(PLAIN_STOP)[0]
                pending = ""
                for _ in streamer:  # drain what is left; generation stops by itself at the stop string
                    pass
                break
            if len(pending) > keep:
                yield pending[:-keep]
                pending = pending[-keep:]
        if pending:
            yield pending
    else:
        yield from streamer
    thread.join()
    if info is not None:
        info["new_tokens"] = streamer.new_tokens
    if errors:
        raise errors[0]
