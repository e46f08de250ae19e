"""Models for the dashboard: what can be chosen, and a bounded, thread-safe pool of loaded models.

Each (model, adapter) pair is its own model object with its own lock, so one session's
generation never runs on weights another session is switching; the pool keeps at most
``capacity`` of them (least recently used goes first).
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from . import chat, engine, generation, models
from .limits import REPLY_TOKENS
from .paths import FINAL, MODELS_DIR, has_adapter


class ChoiceError(ValueError):
    pass


@dataclass(frozen=True)
class Choice:
    """One selectable model: a base (``adapter`` None) or a base plus a trained adapter."""

    label: str
    model: str
    adapter: str | None = None
    engine: str = "torch"  # or "llama.cpp": the shipped GGUF, the adapter from its exported lora.gguf


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def available_choices(models_dir: Path = MODELS_DIR, bases: tuple[str, ...] | None = None) -> list[Choice]:
    """The offline presets as bases, and every trained adapter under ``models_dir``."""
    table = models.presets()
    bases = bases if bases is not None else tuple(k for k, v in table.items() if v["source"] != "hub")
    out = [Choice(f"{b} (base)", b) for b in bases]
    for adapter in trained_adapters(models_dir):
        run = models.read_run(adapter)
        out.append(
            Choice(f"{run['model']} (LoRA: {adapter.relative_to(models_dir)})", run["config"]["model"], str(adapter))
        )
    return out


def trained_adapters(models_dir: Path = MODELS_DIR) -> list[Path]:
    """Folders under ``models_dir`` holding a finished adapter (``run.json`` + ``final/``)."""
    models_dir = Path(models_dir)
    if not models_dir.exists():
        return []
    found = []
    for run in sorted(models_dir.rglob("run.json")):
        folder = run.parent
        if has_adapter(folder) and _inside(folder, models_dir):
            found.append(folder)
    return found


def check_adapter_path(adapter: str | Path, models_dir: Path = MODELS_DIR) -> Path:
    """Refuse adapter folders outside ``models_dir`` (symlinks resolved) or without adapter_config.json."""
    path = Path(adapter)
    if not _inside(path, Path(models_dir)):
        raise ChoiceError(
            f"adapter {adapter} is outside {models_dir}; only adapters under the models folder are loaded"
        )
    if not has_adapter(path):
        raise ChoiceError(f"{path} has no {FINAL}/adapter_config.json; expected a trained adapter folder")
    return path


@dataclass
class Entry:
    loaded: models.LoadedModel  # on llama.cpp: tokenizer and spec only (model is None)
    fmt: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    llama: object | None = None  # engine.LlamaCppModel on the llama.cpp engine


class ModelPool:
    """Loaded models keyed by (model, adapter); at most ``capacity`` kept (LRU)."""

    def __init__(self, capacity: int = 2, models_dir: Path = MODELS_DIR):
        self.capacity, self.models_dir = capacity, Path(models_dir)
        self._entries: OrderedDict[tuple, Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[tuple, threading.Lock] = {}

    def get(self, choice: Choice) -> Entry:
        key = (choice.model, choice.adapter, choice.engine)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
            load_lock = self._loading.setdefault(key, threading.Lock())
        with load_lock:  # one load per key even when two sessions ask at once
            with self._lock:
                if key in self._entries:
                    return self._entries[key]
            if choice.adapter:
                check_adapter_path(choice.adapter, self.models_dir)
            if choice.engine == "llama.cpp":
                entry = _llama_entry(choice)
            else:
                engine.check_engine(choice.engine)
                loaded = (models.load_finetuned(choice.adapter, merge=True) if choice.adapter
                          else models.load_model(choice.model))
                entry = Entry(loaded, chat.chat_format(loaded.spec, loaded.tokenizer))
            with self._lock:
                self._entries[key] = entry
                while len(self._entries) > self.capacity:
                    self._entries.popitem(last=False)
            return entry

    def loaded_keys(self) -> list[tuple]:
        with self._lock:
            return list(self._entries)


def _llama_entry(choice: Choice) -> Entry:
    """The choice on llama.cpp: our tokenizer builds the prompt ids, llama.cpp generates."""
    engine.check_engine("llama.cpp")
    spec = models.resolve(choice.model)
    llama = engine.load_llama_cpp(choice.model, choice.adapter, form="adapter")  # refuses non-GGUF models first
    tokenizer = models.load_tokenizer(choice.model)
    loaded = models.LoadedModel(None, tokenizer, spec, {"engine": "llama.cpp", "gguf": str(llama.gguf),
                                                        "lora": str(llama.lora) if llama.lora else None})
    return Entry(loaded, chat.chat_format(spec, tokenizer), llama=llama)


@dataclass
class StreamStats:
    latency_s: float = 0.0
    ttft_s: float | None = None
    new_tokens: int = 0
    words: int = 0
    prompt_tokens: int = 0
    truncated: bool = False  # the prompt was cut from the left to fit

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.latency_s if self.latency_s else 0.0


def stream_reply(entry: Entry, messages: list[dict], stats: StreamStats,
                 max_new_tokens: int = REPLY_TOKENS["dashboard"],
                 do_sample: bool = False, temperature: float = 0.7, top_p: float = 0.9, seed: int | None = 0,
                 max_prompt_tokens: int = 768) -> Iterator[str]:
    """Stream the reply to ``messages`` and fill ``stats`` (latency, time to first token, tokens, words)."""
    start = time.perf_counter()
    text, info = "", {}
    if entry.llama is not None:
        tok = entry.loaded.tokenizer
        full = len(generation.prompt_ids(tok, messages, entry.fmt))
        ids = generation.prompt_ids(tok, messages, entry.fmt, max_prompt_tokens)
        info.update(prompt_tokens=len(ids), truncated=full > len(ids))
        pieces = entry.llama.stream(ids, max_new_tokens, info=info, do_sample=do_sample, temperature=temperature,
                                    top_p=top_p, seed=seed,
                                    stop=[generation.PLAIN_STOP] if entry.fmt == "plain" else None)
    else:
        pieces = generation.stream(entry.loaded.model, entry.loaded.tokenizer, messages, entry.fmt,
                                   max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                   top_p=top_p, seed=seed, max_prompt_tokens=max_prompt_tokens, lock=entry.lock,
                                   info=info)
    for piece in pieces:
        if piece and stats.ttft_s is None:
            stats.ttft_s = time.perf_counter() - start
        text += piece
        yield piece
    stats.latency_s = time.perf_counter() - start
    stats.new_tokens = info.get("new_tokens", 0)
    stats.prompt_tokens, stats.truncated = info.get("prompt_tokens", 0), info.get("truncated", False)
    stats.words = len(text.split())


def generate_reply(entry: Entry, messages: list[dict], **kw) -> tuple[str, StreamStats]:
    stats = StreamStats()
    text = "".join(stream_reply(entry, messages, stats, **kw))
    return text.strip(), stats
