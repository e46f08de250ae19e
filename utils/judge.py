"""LLM-as-judge: rubric grades and pairwise verdicts from a local instruct model (default:
Qwen2.5-Coder-1.5B-Instruct, preset ``qwen2.5-coder-1.5b``).

Grades (G-Eval style, no generation). The judge reads one fixed instruction block that defines
every criterion (its key/value cache is computed once and reused for every reply), then the
user's message, an optional reference answer, an optional category note and the reply, and then,
for each criterion, a short question "grade the <criterion> ..." right before its answer. The
grade is the expected value of 1..5 under the judge's next-token probabilities of the digits
"1".."5" (renormalised over those five). The criteria share the reply's cache and are asked in
one batched forward pass, so a reply costs one pass over its own tokens plus a few tokens per
criterion.

Pairwise verdicts (as MT-bench does): the judge sees both replies and says which is better
("A" or "B"), in both orders. ``p_first`` is the mean over the two orders of the probability that
the first model's reply is the better one, so position bias cancels; the verdict is a win or a
loss only when both orders agree, otherwise a tie.

The compute dtype is chosen from the machine (``utils.hardware``): bf16 where the CPU multiplies
bf16 fast, int8 dynamic quantisation of the linear layers where it does not, fp32 on request.
Every result records which one was used.
"""
from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass
from typing import Sequence

DEFAULT_JUDGE = "qwen2.5-coder-1.5b"
CRITERIA = ("relevance", "coherence", "overall")

SYSTEM = ("You are a strict, careful evaluator of replies written by an AI assistant. You judge substance, "
          "not style: a reply that is fluent but factually wrong, unsafe, evasive, or that does not answer "
          "the question gets a low grade.")

INSTRUCTIONS = """You will read a user's message and an assistant's reply, and then grade the reply from 1 to 5 on the criterion I name at the end.

The criteria:
- Relevance: does the reply respond to what the user asked?
  5 = addresses the request directly. 3 = partly addresses it, or drifts away from it. 1 = ignores or dodges the request, only repeats the question, talks about the general subject or something else without answering, or is empty.
- Coherence: is the reply well-formed and easy to follow, whatever its content?
  5 = clear, grammatical sentences that fit together. 3 = understandable but awkward, disjointed or repetitive. 1 = word salad, scrambled words, the same phrase looping, or empty.
- Overall: how good is the reply as an answer to this user? Check correctness first, then helpfulness, relevance and clarity.
  5 = correct, safe, helpful and complete. 4 = correct and helpful but brief or missing something. 3 = partly helpful. 2 = unhelpful, evasive or beside the point. 1 = wrong, harmful, nonsensical or empty.
  Any factual error or unsafe advice makes the overall grade 1 or 2, however well it is written.
"""

QUESTION = {
    "relevance": "Grade the relevance of the reply (1-5). Answer with the digit only.",
    "coherence": "Grade the coherence of the reply (1-5). Answer with the digit only.",
    "overall": "Grade the reply overall (1-5). Remember: factual errors or unsafe advice mean 1 or 2. "
               "Answer with the digit only.",
}

PAIR_INSTRUCTIONS = """You will read a user's message and two replies, A and B, written by AI assistants. Decide which reply is the better answer to this user: check correctness and safety first, then whether it answers what was asked, then helpfulness and clarity. A fluent reply with a factual error or unsafe advice loses to a plain correct one. Do not prefer a reply because of its position or its length.
"""
PAIR_QUESTION = "Which reply is better, A or B? Answer with the letter only."

MAX_PROMPT_CHARS, MAX_REPLY_CHARS = 1500, 2000


class JudgeError(ValueError):
    pass


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + " [...]"


def reply_block(prompt: str, reply: str, reference: str | None = None, note: str | None = None) -> str:
    parts = [f"\n[User message]\n{_clip(prompt, MAX_PROMPT_CHARS)}\n"]
    if reference:
        parts.append(f"\n[A reference answer: one good answer; other correct answers are fine too]\n"
                     f"{_clip(reference, MAX_REPLY_CHARS)}\n")
    if note:
        parts.append(f"\n[What a good reply does for this kind of message]\n{note}\n")
    parts.append(f"\n[Assistant reply]\n{_clip(reply, MAX_REPLY_CHARS)}\n[End of reply]\n\n")
    return "".join(parts)


def pair_block(prompt: str, first: str, second: str, note: str | None = None) -> str:
    text = f"\n[User message]\n{_clip(prompt, MAX_PROMPT_CHARS)}\n"
    if note:
        text += f"\n[What a good reply does for this kind of message]\n{note}\n"
    return (text + f"\n[Reply A]\n{_clip(first, MAX_REPLY_CHARS)}\n[End of reply A]\n"
            f"\n[Reply B]\n{_clip(second, MAX_REPLY_CHARS)}\n[End of reply B]\n\n")


@dataclass
class Timing:
    passes: int = 0
    seconds: float = 0.0
    tokens: int = 0


class LLMJudge:
    """Rubric grades and pairwise verdicts from a local causal LM (preset, folder or hub id)."""

    def __init__(self, model: str = DEFAULT_JUDGE, dtype: str = "auto"):
        import torch

        from . import chat, hardware, models

        self.name = model
        loaded = models.load_model(model)
        self.tokenizer, self.spec = loaded.tokenizer, loaded.spec
        self.fmt = chat.chat_format(loaded.spec, self.tokenizer)
        self.dtype = hardware.pick_dtype(dtype, purpose="inference")
        self.model = _cast(loaded.model.eval(), self.dtype)
        self.info = {"model": model, "dtype": self.dtype, "weights": loaded.info.get("weights"),
                     "gguf_sha256": loaded.info.get("gguf_sha256"), "cpu": hardware.cpu_summary(),
                     "load_seconds": loaded.info.get("load_seconds"), "threads": torch.get_num_threads()}
        self.grade_ids = [self._single_token(str(g)) for g in range(1, 6)]
        self.letter_ids = [self._single_token(c) for c in "AB"]
        self._grade_prefix = self._prefix(INSTRUCTIONS)
        self._pair_prefix = self._prefix(PAIR_INSTRUCTIONS)
        self.timing = {"grade": Timing(), "pair": Timing()}

    # ------------------------------------------------------------------ prompt pieces

    def _single_token(self, text: str) -> int:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise JudgeError(f"judge {self.name}: {text!r} is not a single token ({ids}); pick another judge model")
        return ids[0]

    def _prefix(self, instructions: str) -> dict:
        """Token ids of the text before and after the per-reply part, and the cached prefix."""
        import torch

        from . import chat

        marker = "\x00REPLY\x00"
        messages = ([{"role": "system", "content": SYSTEM}] if self.fmt == "template" else []) + \
            [{"role": "user", "content": (instructions if self.fmt == "template" else SYSTEM + "\n\n" + instructions)
              + marker}]
        text = chat.prompt_text(messages, self.tokenizer, self.fmt)
        head, tail = text.split(marker)
        head_ids = self.tokenizer(head, add_special_tokens=self.fmt == "plain")["input_ids"]
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([head_ids]), use_cache=True, logits_to_keep=1)
        return {"ids": head_ids, "cache": out.cache, "tail": tail}

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # ------------------------------------------------------------------ the forward passes

    def _score_options(self, prefix: dict, body: str, questions: Sequence[str], option_ids: Sequence[int],
                       kind: str):
        """For each question: the judge's probabilities over ``option_ids`` as the answer's first token,
        after ``prefix`` + ``body`` (shared, computed once) + the question."""
        import torch

        start = time.perf_counter()
        body_ids = self._encode(body)
        cache = copy.deepcopy(prefix["cache"])
        suffixes = [self._encode(q + prefix["tail"]) for q in questions]
        width = max(len(s) for s in suffixes)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        with torch.inference_mode():
            self.model(input_ids=torch.tensor([body_ids]), cache=cache, use_cache=True, logits_to_keep=1)
            cache.batch_repeat_interleave(len(suffixes))
            # right padding: each row's answer is read at its own last real token, which never sees the padding
            batch = torch.tensor([s + [pad] * (width - len(s)) for s in suffixes])
            logits = self.model(input_ids=batch, cache=cache, use_cache=True).logits
            last = torch.tensor([len(s) - 1 for s in suffixes])
            picked = logits[torch.arange(len(suffixes)), last][:, list(option_ids)].float()
        probs = torch.softmax(picked, dim=-1)
        seconds = time.perf_counter() - start
        timing = self.timing[kind]
        timing.passes += 1
        timing.seconds += seconds
        timing.tokens += len(body_ids) + sum(len(s) for s in suffixes)
        return probs, seconds

    def grade(self, prompt: str, reply: str, reference: str | None = None, note: str | None = None,
              criteria: Sequence[str] = CRITERIA) -> dict:
        """Expected grade 1-5 per criterion (and the probability of each grade). An empty reply
        gets 1 on every criterion without asking the judge."""
        import torch

        unknown = [c for c in criteria if c not in QUESTION]
        if unknown:
            raise JudgeError(f"unknown criteria {unknown}; expected some of {list(QUESTION)}")
        if not reply.strip():
            return {**{c: 1.0 for c in criteria}, "judge_seconds": 0.0,
                    **{f"{c}_probs": [1.0, 0.0, 0.0, 0.0, 0.0] for c in criteria}}
        probs, seconds = self._score_options(self._grade_prefix, reply_block(prompt, reply, reference, note),
                                             [QUESTION[c] for c in criteria], self.grade_ids, "grade")
        grades = (probs * torch.arange(1, 6)).sum(-1)
        out = {c: float(g) for c, g in zip(criteria, grades)}
        out.update({f"{c}_probs": [round(float(p), 4) for p in row] for c, row in zip(criteria, probs)})
        out["judge_seconds"] = seconds
        return out

    def prefer(self, prompt: str, first: str, second: str, note: str | None = None) -> float:
        """Probability (judge's) that ``first`` is the better reply, shown in the order first, second."""
        if not first.strip() and not second.strip():
            return 0.5
        probs, _ = self._score_options(self._pair_prefix, pair_block(prompt, first, second, note), [PAIR_QUESTION],
                                       self.letter_ids, "pair")
        return float(probs[0, 0])

    def compare(self, prompt: str, a: str, b: str, note: str | None = None) -> dict:
        """A vs B in both orders: ``p_a`` (mean probability that A is better) and the verdict."""
        ab = self.prefer(prompt, a, b, note)
        ba = 1.0 - self.prefer(prompt, b, a, note)
        verdict = "A" if ab > 0.5 and ba > 0.5 else "B" if ab < 0.5 and ba < 0.5 else "tie"
        return {"p_a": (ab + ba) / 2, "p_a_shown_first": ab, "p_a_shown_second": ba, "verdict": verdict}

    def timing_summary(self) -> dict:
        """Judge time per graded reply and per pairwise order (one pass each), and tokens per pass."""
        out = {}
        for kind, t in self.timing.items():
            out[kind] = {"passes": t.passes, "seconds": round(t.seconds, 2),
                         "seconds_per_pass": round(t.seconds / t.passes, 3) if t.passes else None,
                         "tokens_per_pass": round(t.tokens / t.passes, 1) if t.passes else None}
        return out


def _cast(model, dtype: str):
    import torch

    if dtype == "bf16":
        return model.to(torch.bfloat16)
    if dtype == "int8":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    if dtype == "fp32":
        return model.float()
    raise JudgeError(f"dtype={dtype!r}; expected auto, fp32, bf16 or int8")
