"""Generation engines: ``torch`` (transformers, the default) and ``llama.cpp``.

The llama.cpp engine runs llama.cpp in-process through ``xllamacpp`` (a prebuilt CPU wheel,
pinned in requirements.txt; nothing to compile). It serves the shipped GGUF of a preset as the
base model, and a fine-tuned model either as that GGUF plus the adapter exported by
``utils.export`` (``lora.gguf``, applied at run time: ``form="adapter"``) or as the merged GGUF
(``form="merged"``).

Both engines are given the *same token ids*: the prompt is built and tokenised by our own chat
code (``generation.prompt_ids``), so the chat format, the system prompt a template inserts and
truncation cannot differ between them. Greedy decoding is ``top_k = 1``; a stop string (the plain
format's "\\nUser:") is passed to llama.cpp as a stop word, and end-of-generation tokens come from
the GGUF's metadata on llama.cpp and from the model's generation config on torch.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from .limits import REPLY_TOKENS

ENGINES = ("torch", "llama.cpp")
XLLAMACPP_VERSION = "2026.10.11549"  # keep in step with requirements.txt
FORMS = ("adapter", "merged")


class EngineError(ValueError):
    pass


def check_engine(engine: str, parameter: str = "engine") -> str:
    if engine not in ENGINES:
        raise EngineError(f"{parameter}={engine!r}; expected one of {ENGINES}")
    if engine == "llama.cpp":
        xllamacpp()
    return engine


def check_engines(engines, parameter: str = "engines") -> list[str]:
    if isinstance(engines, str) or not engines:
        raise EngineError(f"{parameter}={engines!r}; expected a non-empty list drawn from {ENGINES}")
    return [check_engine(e, parameter) for e in engines]


def xllamacpp():
    try:
        import xllamacpp as module
    except ImportError:
        raise EngineError(
            f"engine 'llama.cpp' needs the xllamacpp package (pinned {XLLAMACPP_VERSION} in "
            f"requirements.txt): run `make venv`, or `pip install xllamacpp=={XLLAMACPP_VERSION}`"
        ) from None
    return module


def gguf_field(path: str | Path, key: str):
    import gguf

    field = gguf.GGUFReader(str(path)).get_field(key)
    return field.contents() if field is not None else None


def check_lora_base(lora: Path, base: Path) -> None:
    """A LoRA GGUF written by ``utils.export`` names the sha256 of its base: refuse another base."""
    from .export import BASE_SHA_KEY
    from .models import file_sha256

    wanted = gguf_field(lora, BASE_SHA_KEY)
    if wanted is None:
        return  # not ours: llama.cpp itself checks the architecture and tensor shapes
    have = file_sha256(base)
    if have != wanted:
        raise EngineError(f"LoRA GGUF {lora} was exported against a base with sha256 {wanted[:16]}..., but {base} has "
                          f"{have[:16]}...: re-export it with `python -m utils.export <adapter folder>`")


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    seconds: float
    decode_tokens_per_s: float | None
    prompt_tokens_per_s: float | None
    finish_reason: str | None = None
    timings: dict = field(default_factory=dict)


class LlamaCppModel:
    """One GGUF (plus an optional LoRA GGUF) in an in-process llama.cpp server. Calls are
    serialised by a lock (one slot: the KV cache belongs to one conversation at a time)."""

    def __init__(self, gguf: str | Path, lora: str | Path | None = None, n_ctx: int = 2048,
                 threads: int | None = None, lora_scale: float = 1.0):
        module = xllamacpp()
        self.gguf, self.lora = Path(gguf), Path(lora) if lora else None
        for path in (self.gguf, self.lora):
            if path is not None and not path.exists():
                raise EngineError(
                    f"{path} not found"
                    + (" (export the adapter: python -m utils.export <adapter folder>)" if path is self.lora else "")
                )
        if self.lora is not None:
            check_lora_base(self.lora, self.gguf)
        import torch

        self.threads = threads or torch.get_num_threads()
        params = module.CommonParams()
        params.model.path = str(self.gguf)
        params.n_ctx = n_ctx
        params.n_parallel = 1
        params.cpuparams.n_threads = self.threads
        params.cpuparams_batch.n_threads = self.threads
        params.verbosity = -1  # llama.cpp otherwise logs every request to stderr
        if self.lora is not None:
            params.lora_adapters = [module.CommonAdapterLoraInfo(str(self.lora), float(lora_scale))]
        start = time.perf_counter()
        self.server = module.Server(params)
        self.load_seconds = time.perf_counter() - start
        self.n_ctx = n_ctx
        self.lock = threading.Lock()

    def request(self, ids: list[int], max_new_tokens: int, do_sample: bool = False, temperature: float = 0.7,
                top_p: float = 0.9, seed: int | None = 0, stop: list[str] | None = None,
                fixed_length: bool = False) -> dict:
        body = {"prompt": list(ids), "n_predict": int(max_new_tokens), "cache_prompt": False, "n_probs": 1,
                "stop": list(stop or []), "ignore_eos": bool(fixed_length)}
        if do_sample:
            body.update(temperature=float(temperature), top_p=float(top_p), top_k=0,
                        seed=int(seed) if seed is not None else -1)
        else:
            body.update(temperature=0.0, top_k=1)
        if len(ids) + max_new_tokens > self.n_ctx:
            raise EngineError(f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the llama.cpp "
                              f"context of {self.n_ctx} tokens")
        return body

    def complete(self, ids: list[int], max_new_tokens: int = REPLY_TOKENS["evaluation"],
                 on_piece: Callable[[str], None] | None = None,
                 **kw) -> Completion:
        """Generate after ``ids``; ``on_piece`` is called with each new piece of text as it comes."""
        body = self.request(ids, max_new_tokens, **kw)
        pieces, token_ids, last = [], [], {}

        def chunk(data):
            if isinstance(data, str):
                import json

                data = json.loads(data)
            if "error" in data:
                raise EngineError(f"llama.cpp: {data['error']}")
            choice = data["choices"][0]
            for item in (choice.get("logprobs") or {}).get("content") or []:
                token_ids.append(int(item["id"]))
            if choice.get("text"):
                pieces.append(choice["text"])
                if on_piece is not None:
                    on_piece(choice["text"])
            last.update(data)

        start = time.perf_counter()
        with self.lock:
            if on_piece is None:
                chunk(self.server.handle_completions(body))
            else:
                errors = []
                self.server.handle_completions({**body, "stream": True}, chunk_guard(chunk, errors))
                if errors:
                    raise errors[0]
        seconds = time.perf_counter() - start
        timings = last.get("timings") or {}
        return Completion("".join(pieces), token_ids, len(ids), seconds, timings.get("predicted_per_second"),
                          timings.get("prompt_per_second"), last.get("choices", [{}])[0].get("finish_reason"), timings)

    def stream(self, ids: list[int], max_new_tokens: int = REPLY_TOKENS["dashboard"], info: dict | None = None,
               **kw) -> Iterator[str]:
        """Yield the reply piece by piece (generation runs in a worker thread)."""
        pieces: queue.Queue = queue.Queue()
        done = object()
        result: dict = {}

        def work():
            try:
                result["completion"] = self.complete(ids, max_new_tokens, on_piece=pieces.put, **kw)
            except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
                result["error"] = err
            finally:
                pieces.put(done)

        threading.Thread(target=work, daemon=True).start()
        while (piece := pieces.get()) is not done:
            yield piece
        if "error" in result:
            raise result["error"]
        if info is not None:
            info["new_tokens"] = len(result["completion"].token_ids)

    def close(self) -> None:
        self.server = None


def chunk_guard(handler, errors: list) -> Callable:
    """Streaming callbacks run inside llama.cpp's loop: keep exceptions for the caller."""
    def call(data):
        if errors:
            return
        try:
            handler(data)
        except BaseException as err:  # noqa: BLE001
            errors.append(err)
    return call


def exported_gguf(adapter_root: str | Path, form: str = "adapter", merged_type: str = "Q8_0") -> Path:
    """The llama.cpp file of a trained adapter (exported on first use)."""
    from . import export

    if form not in FORMS:
        raise EngineError(f"form={form!r}; expected one of {FORMS}")
    out_dir = Path(adapter_root) / "gguf"
    path = out_dir / ("lora.gguf" if form == "adapter" else f"merged-{merged_type.lower()}.gguf")
    if not path.exists():
        export.export(adapter_root, out_dir, merged_type=merged_type, merged=form == "merged")
    return path


def load_llama_cpp(model: str, adapter_root: str | Path | None = None, form: str = "adapter",
                   n_ctx: int = 2048) -> LlamaCppModel:
    """A preset's shipped GGUF, or a trained adapter on it (``form`` adapter or merged)."""
    from . import models

    spec = models.resolve(model)
    if spec.get("source") != "gguf":
        raise EngineError(f"engine 'llama.cpp' needs a GGUF model; {spec['name']!r} has source {spec.get('source')!r} "
                          f"(use engine 'torch')")
    base = models.gguf_path(spec)
    if adapter_root is None:
        return LlamaCppModel(base, n_ctx=n_ctx)
    path = exported_gguf(adapter_root, form)
    return LlamaCppModel(base, lora=path, n_ctx=n_ctx) if form == "adapter" else LlamaCppModel(path, n_ctx=n_ctx)
