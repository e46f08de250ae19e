"""Side-by-side evaluation: every model, base and fine-tuned (adapter merged), answers the same
prompts greedily: the domain suite (``data/eval/domain_suite.yaml``, by category) and a seeded sample
of the held-out test split. A local LLM judge (``utils.judge``) grades every reply (relevance,
coherence, overall; 1-5) and compares the models pairwise in both orders; cheap signals (length,
distinct-2, embedding similarity, ROUGE-L, chrF, held-out loss) are kept as their own columns.
Means come with 95% bootstrap intervals and n. Results go to ``<report_dir>/evaluation.json`` and
``<report_dir>/samples.jsonl``.
"""
from __future__ import annotations

import gc
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence


from . import chat, generation, hardware, judge as J, metrics, models, safety
from .data import read_jsonl
from .io import write_json_atomically, write_text_atomically
from .limits import REPLY_TOKENS
from .suite import DOMAIN_SUITE, EvaluationError, category_notes, load_domain_suite  # noqa: F401
from .validity import validity_cached, validity_key  # noqa: F401
from .paths import MODELS, PROCESSED, adapter_root, from_root, has_adapter, require, shown

SUITES = ("both", "domain", "test")
METRICS = ("words", "new_tokens", "latency_s", *metrics.GRADES, "distinct_2", "prompt_similarity",
           *metrics.REFERENCE, "judge_seconds")
TEST_CATEGORY = "test split"
WIN = ("win_rate", "low", "high")  # interval_text keys of a win-rate summary


@dataclass
class EvalConfig:
    """Parameters of ``notebooks/03_evaluate.ipynb`` (same names)."""

    models: list = field(default_factory=lambda: ["smollm2-135m", "gemma3-270m"])  # presets, folders or hub ids
    data_dir: str = PROCESSED  # output of 01_data_prep
    split: str = "test"  # held-out split the test prompts come from
    suite: str = "both"  # "domain" (the domain suite), "test" (the test split sample) or "both"
    num_examples: int = 40  # prompts sampled from the test split
    max_new_tokens: int = REPLY_TOKENS["evaluation"]  # reply length cap
    batch_size: int = 8  # prompts generated together
    dtype: str = "auto"  # generation: "bf16", "fp32", or "auto" (bf16 where the CPU has it natively)
    seed: int = 42  # sample and bootstrap seed
    report_dir: str | None = None  # where evaluation.json, samples.jsonl and figures go (the pipeline sets it)
    judge_model: str | None = J.DEFAULT_JUDGE  # the LLM judge (preset, folder or hub id); None: cheap signals only
    judge_dtype: str = "auto"  # auto (bf16 where the CPU has it natively, else fp32), fp32, bf16, int8
    judge_suite: str = "auto"  # prompts the judge grades, compares: auto (domain suite if any), domain, test, both
    pairwise: bool = True  # the judge compares the models' replies in both orders
    validity: str = "cached"  # judge validity study: "cached" (from `make validate`), "score" (30-60 min), "off"
    allow_judge_as_model: bool = False  # True lets the judge be a compared model (flagged in the report)
    loss_examples: int = 64  # validation conversations for held-out loss / perplexity
    models_dir: str = MODELS  # where trained adapters are (<models_dir>/<name>-lora/final)


def pick_examples(rows: Sequence[dict], n: int, seed: int) -> list[dict]:
    """A seeded sample of ``n`` conversations (all of them if fewer), in file order."""
    if n <= 0:
        raise EvaluationError(f"num_examples={n}; expected > 0")
    idx = sorted(random.Random(seed).sample(range(len(rows)), min(n, len(rows))))
    return [rows[i] for i in idx]


def heldout_loss(model, tokenizer, fmt: str, rows: Sequence[dict], max_seq_len: int = 256, batch_size: int = 8) -> dict:
    """Token-weighted cross-entropy on assistant tokens, and perplexity = exp(loss)."""
    import torch
    from transformers import DataCollatorForSeq2Seq

    encoded, _ = chat.encode_rows(rows, tokenizer, fmt, max_seq_len)
    collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=chat.IGNORE_INDEX)
    total, count = 0.0, 0
    for i in range(0, len(encoded), batch_size):
        batch = collate(
            [{k: r[k] for k in ("input_ids", "attention_mask", "labels")} for r in encoded[i : i + batch_size]]
        )
        with torch.inference_mode():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=chat.IGNORE_INDEX, reduction="sum")
        total += float(loss)
        count += int((labels != chat.IGNORE_INDEX).sum())
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count, "n": len(encoded)}


def variants(model: str, models_dir: Path) -> list[dict]:
    """The base model and, when their adapters exist, the fine-tuned one (SFT LoRA) and its
    preference-tuned continuation (SFT + DPO LoRA, ``utils.dpo``)."""
    from .dpo import dpo_root

    name = models.resolve(model)["name"]
    out = [{"name": f"{name} (base)", "model": model, "kind": "base"}]
    adapter = adapter_root(name, models_dir)
    if has_adapter(adapter):
        out.append({"name": f"{name} (LoRA)", "model": model, "kind": "lora", "adapter": str(adapter)})
        if has_adapter(dpo_root(name, models_dir)):
            out.append({"name": f"{name} (DPO)", "model": model, "kind": "dpo",
                        "adapter": str(dpo_root(name, models_dir))})
    return out


def _load(variant: dict, dtype: str = "fp32"):
    import torch

    loaded = (models.load_model(variant["model"]) if variant["kind"] == "base"
              else models.load_finetuned(variant["adapter"], merge=True))
    if dtype == "bf16":
        loaded.model.to(torch.bfloat16)
    return loaded


def eval_items(cfg: EvalConfig) -> list[dict]:
    """The prompts of this evaluation: the domain suite, the test split sample, or both."""
    if cfg.suite not in SUITES:
        raise EvaluationError(f"suite={cfg.suite!r}; expected one of {list(SUITES)}")
    items = list(load_domain_suite()) if cfg.suite in ("both", "domain") else []
    if cfg.suite in ("both", "test"):
        path = require(from_root(cfg.data_dir) / f"{cfg.split}.jsonl", "01_data_prep.ipynb", EvaluationError)
        for row in pick_examples(read_jsonl(path), cfg.num_examples, cfg.seed):
            history, user, reference = chat.split_prompt(row)
            items.append({"id": row["id"], "category": TEST_CATEGORY, "prompt": user, "history": history,
                          "reference": reference, "note": None})
    return items


def check_inputs(cfg: EvalConfig, log=print) -> None:
    """Stop before any work when the data splits are missing (naming the notebook that writes them);
    say which models have no trained adapter yet (their base model is evaluated alone)."""
    if cfg.suite in ("both", "test"):
        require(from_root(cfg.data_dir) / f"{cfg.split}.jsonl", "01_data_prep.ipynb", EvaluationError)
    if cfg.loss_examples:
        require(from_root(cfg.data_dir) / "validation.jsonl", "01_data_prep.ipynb", EvaluationError)
    untrained = [m for m in cfg.models if not has_adapter(adapter_root(models.resolve(m)["name"], cfg.models_dir))]
    if untrained:
        log(f"no trained adapter for {untrained} under {shown(from_root(cfg.models_dir))}: run "
            "notebooks/02_train_lora.ipynb first to compare base and fine-tuned (their base models are evaluated "
            "alone)")


def summary(result: dict) -> str:
    """What this evaluation showed (markdown): the verdicts first, then how far the judge can be
    trusted on replies of known rank."""
    lines = ([f"**{' '.join(result['headline'])}**", ""] if result.get("headline") else []) + (
        [f"- {v}" for v in result["verdicts"]] or ["- One model variant only: nothing to compare."])
    for key, how in VALIDITY_VIEWS.items():
        v = result.get(key)
        if v:
            shares = ", ".join(f"{g} {100 * v['shares'][g]['share']:.0f}%"
                               for g in ("relevance", "coherence", "overall"))
            lines.append(f"- The judge ranks known-order replies right ({how}): {shares} of pairs "
                         f"(good vs fluent-but-wrong {100 * v['shares']['good_vs_wrong']['share']:.0f}%).")
    n = next(iter(result["summary"].values()))["words"]["n"] if result["summary"] else 0
    lines.append(f"- {n} prompts per model ({', '.join(f'{k} {c}' for c, k in result['categories'].items())}); "
                 "differences whose interval includes 0 are not differences.")
    return "\n".join(lines)


# The validity ladder graded as each part of the suite is graded: test-split prompts without a
# rubric line ("validity"), domain-suite prompts with their category's line ("validity_notes").
VALIDITY_VIEWS = {"validity": "graded as the test split is, no rubric line",
                  "validity_notes": "graded as the domain suite is, with each category's rubric line"}


def validity_needed(suite: str) -> dict[str, bool]:
    """Which ladder views a suite's grades need: result key -> grade with notes."""
    out = {}
    if suite in ("both", "test"):
        out["validity"] = False
    if suite in ("both", "domain"):
        out["validity_notes"] = True
    return out


JUDGE_SUITES = ("auto", "domain", "test", "both")
VALIDITY_MODES = ("cached", "score", "off")


def judge_suite_of(cfg: EvalConfig) -> str:
    """What the judge grades and compares: ``judge_suite``'s prompts among those the evaluation has
    ("auto": the domain suite when it has it, else the test split); "none" when they share none.
    The rest of the prompts get length, reference metrics and loss only: the verdict is about the
    domain suite, and grading the test split's one-line references too costs the judge 40% more."""
    if cfg.judge_suite not in JUDGE_SUITES:
        raise EvaluationError(f"judge_suite={cfg.judge_suite!r}; expected one of {list(JUDGE_SUITES)}")
    if cfg.judge_suite == "auto":
        return "domain" if cfg.suite in ("both", "domain") else "test"
    parts = {"both": {"domain", "test"}, "domain": {"domain"}, "test": {"test"}}
    have = parts.get(cfg.suite, set()) & parts[cfg.judge_suite]
    return "both" if len(have) == 2 else next(iter(have), "none")


def judged_prompt(judge_suite: str, item: dict) -> bool:
    """Whether the judge grades and compares the replies to ``item`` under ``judge_suite``."""
    return judge_suite == "both" or (item["category"] == TEST_CATEGORY) == (judge_suite == "test")


def validity_mode(cfg: EvalConfig) -> str:
    mode = {True: "score", False: "off"}.get(cfg.validity, cfg.validity)
    if mode not in VALIDITY_MODES:
        raise EvaluationError(f"validity={cfg.validity!r}; expected one of {list(VALIDITY_MODES)}")
    return mode


def check_judge(cfg: EvalConfig) -> list[str]:
    """Compared models that are the judge itself: refused unless ``allow_judge_as_model``, then flagged."""
    if not cfg.judge_model:
        return []
    judge_name = models.resolve(cfg.judge_model)["name"]
    same = [m for m in cfg.models if models.resolve(m)["name"] == judge_name]
    if same and not cfg.allow_judge_as_model:
        raise EvaluationError(f"the judge {cfg.judge_model!r} is also a compared model ({same}): a model grading its "
                              "own replies is biased. Pick another judge_model, or set allow_judge_as_model=True and "
                              "the report will flag it")
    return same


def comparisons(all_variants: list[dict]) -> list[tuple[str, str]]:
    """Each fine-tuned model vs its base, each preference-tuned (DPO) model vs its SFT adapter (did
    DPO help?), and the two models' SFT versions vs each other."""
    by_model: dict[str, dict] = {}
    for v in all_variants:
        by_model.setdefault(v["model"], {})[v["kind"]] = v["name"]
    pairs = [(k["lora"], k["base"]) for k in by_model.values() if "lora" in k]
    pairs += [(k["dpo"], k["lora"]) for k in by_model.values() if "dpo" in k and "lora" in k]
    finals = [k.get("lora", k["base"]) for k in by_model.values()]
    if len(finals) >= 2:
        pairs.append((finals[0], finals[1]))
    return pairs


def evaluate(cfg: EvalConfig, log=print) -> dict:
    """Generate, score, compare and summarise; returns the evaluation dict (also written to report_dir)."""
    from tqdm.auto import tqdm

    if not cfg.models:
        raise EvaluationError("models is empty; expected at least one preset, folder or hub id")
    judged_self = check_judge(cfg)
    try:
        dtype = hardware.pick_dtype(cfg.dtype, "generation", allowed=hardware.COMPUTE_DTYPES)
    except ValueError as err:
        raise EvaluationError(str(err)) from err
    items = eval_items(cfg)
    validity_mode(cfg)
    judge_suite = judge_suite_of(cfg)
    if judge_suite == "none" and cfg.judge_model:
        raise EvaluationError(f"judge_suite={cfg.judge_suite!r} but suite={cfg.suite!r}: the judge would grade no "
                              "prompt; set judge_suite to one the suite has, or 'both'")
    if not safety.fitted():  # never behind the user's back: the pipeline fits them in a step of its own
        log("the crisis flags need the safety classifiers, which are not fitted on this machine yet: fitting them "
            "now (once per machine, tens of minutes on 2 cores; `make safety` does it ahead) ...")
    start = time.perf_counter()
    safety.detector()
    log(f"safety classifiers ready in {time.perf_counter() - start:.1f}s")
    data_dir = from_root(cfg.data_dir)
    loss_path = data_dir / "validation.jsonl"
    loss_rows = read_jsonl(loss_path)[: cfg.loss_examples] if loss_path.exists() else []
    histories = [it["history"] for it in items]
    prompts, references, notes = ([it[k] for it in items] for k in ("prompt", "reference", "note"))
    models_dir = from_root(cfg.models_dir)

    all_variants = [v for m in cfg.models for v in variants(m, models_dir)]
    missing = [m for m in cfg.models if not any(v["kind"] == "lora" and v["model"] == m for v in all_variants)]
    if missing:
        log(f"no trained adapter for {missing} under {models_dir}: evaluating their base model only "
            "(run notebooks/02_train_lora.ipynb)")
    replies: dict[str, list[generation.Generated]] = {}
    info: dict[str, dict] = {}
    for variant in tqdm(all_variants, desc="models"):
        loaded = _load(variant, dtype)
        fmt = chat.chat_format(loaded.spec, loaded.tokenizer)
        start = time.perf_counter()
        replies[variant["name"]] = generation.generate_batch(
            loaded.model, loaded.tokenizer, histories, fmt, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size
        )
        gen_seconds = time.perf_counter() - start
        held = (
            heldout_loss(loaded.model, loaded.tokenizer, fmt, loss_rows, batch_size=cfg.batch_size)
            if loss_rows
            else None
        )
        info[variant["name"]] = {
            **variant,
            "chat_format": fmt,
            "dtype": dtype,
            "generation_seconds": round(gen_seconds, 2),
            "total_params": loaded.info["total_params"],
            "heldout": held,
            "random_init": loaded.info.get("random_init", False),
        }
        if variant["kind"] in ("lora", "dpo"):
            run = models.read_run(variant["adapter"])
            info[variant["name"]]["trainable"] = {
                k: run[k] for k in ("trainable_params", "total_params", "trainable_percent")
            }
            if variant["kind"] == "dpo":  # which pairs, from where: the report says it beside the verdict
                info[variant["name"]]["preference"] = {**run["preference_pairs"], "beta": run["beta"],
                                                       "held_out_after": run.get("held_out_after")}
        log(f"{variant['name']}: {len(histories)} replies in {gen_seconds:.1f}s"
            + (f"; held-out loss {held['loss']:.3f}" if held else ""))
        del loaded
        gc.collect()

    judge = J.LLMJudge(cfg.judge_model, dtype=cfg.judge_dtype) if cfg.judge_model else None
    judged = [judged_prompt(judge_suite, it) for it in items]
    if judge is not None:
        log(f"judge {cfg.judge_model}: {judge.dtype} on {judge.info['cpu']['cpu']}; grades {sum(judged)} of "
            f"{len(items)} prompts per model (judge_suite={cfg.judge_suite!r}); grades and verdicts already kept "
            "in the per-machine cache are read, not recomputed")
    scorer = metrics.Scorer(metrics.Embedder(), judge)
    per_example: dict[str, list[dict]] = {}
    for name, gens in replies.items():
        texts = [g.text for g in gens]
        scores = scorer.score(prompts, texts, references, notes,
                              progress=lambda it, name=name: tqdm(it, desc=f"judging {name}", unit="batch",
                                                                  leave=False),
                              truncated=[g.truncated for g in gens], judged=judged)
        per_example[name] = [{"reply": g.text, "category": it["category"], "new_tokens": g.new_tokens,
                              "latency_s": g.latency_s / g.batch_size,
                              "crisis_flag": safety.crisis_flag(it["prompt"]) or safety.crisis_flag(g.text), **s}
                             for it, g, s in zip(items, gens, scores)]

    pairs = comparisons(all_variants)
    pairwise = {}
    if judge is not None and cfg.pairwise:
        for a, b in pairs:
            rows = [i for i in range(len(items)) if judged[i]]
            verdicts = J.compare_all(  # no rubric line: see judge.NOTE_LEAD
                judge, [(prompts[i], per_example[a][i]["reply"], per_example[b][i]["reply"]) for i in rows],
                lambda it, a=a, b=b: tqdm(it, desc=f"{a} vs {b}", unit="batch", leave=False))
            compared = [items[i] for i in rows]
            lengths = ([per_example[a][i]["words"] for i in rows], [per_example[b][i]["words"] for i in rows])
            pairwise[f"{a} vs {b}"] = {"a": a, "b": b, **pairwise_summary(verdicts, cfg.seed, lengths),
                                       "by_category": {c: pairwise_summary([v for v, it in zip(verdicts, compared)
                                                                            if it["category"] == c], cfg.seed)
                                                       for c in categories(compared)},
                                       "per_example": [{"id": it["id"], **v} for it, v in zip(compared, verdicts)]}
    grade_differences = {f"{a} vs {b}": {m: metrics.paired_difference([r.get(m) for r in per_example[a]],
                                                                      [r.get(m) for r in per_example[b]], seed=cfg.seed)
                                         for m in metrics.GRADES + ("words",)}
                         for a, b in pairs}

    summary = {name: {m: metrics.bootstrap_ci([r.get(m) for r in rows], seed=cfg.seed) for m in METRICS}
               for name, rows in per_example.items()}
    by_category = {name: {c: {m: metrics.bootstrap_ci([r.get(m) for r in rows if r["category"] == c], seed=cfg.seed)
                              for m in metrics.GRADES + ("words",)} for c in categories(items)}
                   for name, rows in per_example.items()}
    needed = validity_needed(judge_suite) if judge is not None and validity_mode(cfg) != "off" else {}
    # pairwise verdicts never see a rubric line, so the ladder's pairwise check is the same in both views
    validity_results = {key: validity_cached(judge, notes=notes, pairwise=True, score=validity_mode(cfg) == "score")
                        for key, notes in needed.items()}
    for key in [k for k, v in validity_results.items() if v is None]:
        del validity_results[key]
        log(f"the judge's validity study ({VALIDITY_VIEWS[key]}) has not been scored on this machine with this judge: "
            "`make validate` scores it (30-60 minutes on 2 cores), or set validity='score'")

    result = {
        "schema": 2,
        "config": asdict(cfg),
        "n_examples": len(items),
        "categories": {c: sum(it["category"] == c for it in items) for c in categories(items)},
        "example_ids": [it["id"] for it in items],
        "variants": info,
        "summary": summary,
        "by_category": by_category,
        "comparisons": [list(p) for p in pairs],
        "pairwise": {k: {kk: vv for kk, vv in v.items() if kk != "per_example"} for k, v in pairwise.items()},
        "grade_differences": grade_differences,
        "headline": headline(pairs, pairwise, grade_differences,
                             {"domain": "the domain suite", "test": "the test split", "both": "the domain suite and "
                              "the test split"}[judge_suite] if judge is not None else "the prompts", info),
        "verdicts": verdict_sentences(pairs, pairwise, grade_differences),
        "scores_explained": metrics.__doc__,
        "dtype": dtype,
        "dtype_probe": hardware.dtype_probe(),
        "judge_model": cfg.judge_model,
        "judge": ({**judge.info, "timing": judge.timing_summary(),
                   "seconds_per_reply": metrics.seconds_per_reply(judge.timing_summary())} if judge else None),
        "judge_is_compared": judged_self,
        **{key: ({k: v for k, v in validity_results[key].items() if k != "rows"} if key in validity_results else None)
           for key in VALIDITY_VIEWS},
    }
    samples = [{"id": it["id"], "category": it["category"], "prompt": it["prompt"], "reference": it["reference"],
                **{name: per_example[name][i]["reply"] for name in per_example},
                "crisis_flag": any(per_example[name][i]["crisis_flag"] for name in per_example)}
               for i, it in enumerate(items)]
    result["per_example"] = per_example
    result["pairwise_per_example"] = {k: v["per_example"] for k, v in pairwise.items()}
    result["samples"] = samples
    if cfg.report_dir:
        report_dir = from_root(cfg.report_dir)
        write_json_atomically(report_dir / "evaluation.json", result)
        write_text_atomically(report_dir / "samples.jsonl",
                              "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
        for key, v in validity_results.items():
            write_json_atomically(report_dir / f"{key}.json", v)
    return result


def categories(items: Sequence[dict]) -> list[str]:
    return list(dict.fromkeys(it["category"] for it in items))


def pairwise_summary(verdicts: Sequence[dict], seed: int,
                     lengths: tuple[Sequence[float], Sequence[float]] | None = None) -> dict:
    """Win rate of A (ties half) with a bootstrap interval, wins/ties/losses, the mean preference, and,
    given both sides' reply lengths (words), the length-controlled win rate
    (``metrics.length_controlled_win_rate``) under ``length_controlled``."""
    if not verdicts:
        return {"n": 0, "win_rate": None, "low": None, "high": None, "wins": 0, "ties": 0, "losses": 0}
    a = [1.0 if v["verdict"] == "A" else 0.0 if v["verdict"] == "B" else 0.5 for v in verdicts]
    out = {**metrics.win_rate(a, [1.0 - x for x in a], seed=seed),
           "mean_preference": metrics.bootstrap_ci([v["p_a"] for v in verdicts], seed=seed)}
    if lengths is not None:
        out["length_controlled"] = metrics.length_controlled_win_rate(a, *lengths, seed=seed)
    return out


def length_disagreement(w: dict | None) -> str | None:
    """A sentence when the raw and the length-controlled win rates point different ways (one excludes
    0.5 and the other does not, or they sit on opposite sides); None when they agree."""
    lc = (w or {}).get("length_controlled")
    if not w or not w.get("n") or not lc or lc.get("win_rate") is None:
        return None
    side = lambda s: "A" if s["low"] > 0.5 else "B" if s["high"] < 0.5 else "-"  # noqa: E731
    raw, controlled = side(w), side(lc)
    if raw == controlled:
        return None
    says = {"A": "favours the first", "B": "favours the second", "-": "cannot tell them apart"}
    return (f"the raw win rate {says[raw]} ({metrics.interval_text(w, keys=WIN)}) but at equal length the "
            f"verdicts {says[controlled]} ({metrics.interval_text(lc, keys=WIN)}): length drives the raw verdict")


def _direction(w: dict | None, d: dict | None) -> str:
    """"better", "worse", "mixed" or "unclear" for the first of a pair, from the pairwise win rate
    ``w`` and the paired overall-grade difference ``d`` (each counts where its interval excludes no
    difference)."""
    says = set()
    if w and w.get("n") and w.get("low") is not None:
        says |= {"better"} if w["low"] > 0.5 else {"worse"} if w["high"] < 0.5 else set()
    if d and d.get("mean") is not None:
        says |= {"better"} if d["low"] > 0 else {"worse"} if d["high"] < 0 else set()
    return "mixed" if len(says) == 2 else next(iter(says), "unclear")


def preference_text(info: dict | None) -> str:
    """Where a DPO variant's pairs came from and how many: "24 preference pairs from judge 24, 22 trained on"."""
    p = (info or {}).get("preference")
    if not p:
        return "preference pairs"
    sources = ", ".join(f"{k} {v}" for k, v in p["by_source"].items())
    return f"{p['n']} preference pairs from {sources}, {p['train']} trained on"


def headline(pairs, pairwise: dict, differences: dict, suite: str = "the domain suite",
             variant_info: dict | None = None) -> list[str]:
    """The answer first: which fine-tuned model answers better, then what fine-tuning did to each
    model, then what preference tuning (DPO) did to each SFT model, by the judge's overall grade and
    its pairwise verdicts (n and 95% intervals), and reply length."""
    def evidence(key: str, a: str) -> str:
        w, d, words = pairwise.get(key), differences[key].get("overall"), differences[key].get("words")
        bits = []
        if d and d.get("mean") is not None:
            bits.append(f"overall grade {metrics.interval_text(d, signed=True)} (n={d['n']})")
        if w and w.get("n"):
            bits.append(f"{a} wins {metrics.interval_text(w, keys=WIN)} of {w['n']} pairwise verdicts")
            if w.get("length_controlled", {}).get("win_rate") is not None:
                bits.append(f"{metrics.interval_text(w['length_controlled'], keys=WIN)} length-controlled"
                            + (f" ({length_disagreement(w)})" if length_disagreement(w) else ""))
        if words and words.get("mean") is not None:
            bits.append(f"replies {metrics.interval_text(words, 1, signed=True)} words")
        return "; ".join(bits)

    first, rest = [], []
    for a, b in pairs:
        key = f"{a} vs {b}"
        way = _direction(pairwise.get(key), differences[key].get("overall"))
        if a.endswith("(DPO)") and b == a.replace("(DPO)", "(LoRA)"):
            model = a[:-len(" (DPO)")]
            what = {"better": "helped", "worse": "hurt", "mixed": "helped by one measure and hurt by the other",
                    "unclear": "made no measurable difference"}[way]
            rest.append(f"Preference tuning {model} (DPO on {preference_text((variant_info or {}).get(a))}) {what} "
                        f"against its SFT adapter on {suite}: {evidence(key, a)}.")
        elif a.endswith("(LoRA)") and b == a.replace("(LoRA)", "(base)"):
            model = a[:-len(" (LoRA)")]
            what = {"better": "better", "worse": "worse", "mixed": "better by one measure and worse by the other",
                    "unclear": "no measurable difference"}[way]
            made = f"Fine-tuning made {model} {what}" if way != "unclear" else f"Fine-tuning {model} made {what}"
            rest.append(f"{made} on {suite}: {evidence(key, a)}.")
        else:
            what = {"better": f"{a} answers better than {b}", "worse": f"{b} answers better than {a}",
                    "mixed": f"{a} and {b} split: one measure favours each",
                    "unclear": f"{a} and {b} cannot be told apart"}[way]
            first.append(f"On {suite}, {what}: {evidence(key, a)}.")
    return first + rest


def verdict_sentences(pairs, pairwise: dict, differences: dict) -> list[str]:
    """One sentence per comparison: who is better on what, and where the data cannot tell."""
    out = []
    for a, b in pairs:
        key = f"{a} vs {b}"
        parts = []
        w = pairwise.get(key)
        if w and w["n"]:
            span = f"{a} wins {metrics.interval_text(w, keys=WIN)} of {w['n']} pairwise judgements, ties half"
            if w["low"] > 0.5:
                parts.append(f"the judge prefers {a} ({span})")
            elif w["high"] < 0.5:
                parts.append(f"the judge prefers {b} ({span})")
            else:
                parts.append(f"the judge's pairwise verdicts cannot tell them apart ({span})")
            if length_disagreement(w):
                parts.append(length_disagreement(w))
        better, worse, unclear = [], [], []
        n = None
        for m in metrics.GRADES:
            d = differences[key].get(m)
            if not d or d["mean"] is None:
                continue
            n = d["n"]
            text = f"{m} {metrics.interval_text(d, signed=True)}"
            (better if d["low"] > 0 else worse if d["high"] < 0 else unclear).append(text)
        if better:
            parts.append(f"{a} grades higher on " + ", ".join(better))
        if worse:
            parts.append(f"{a} grades lower on " + ", ".join(worse))
        if unclear:
            parts.append("the data cannot tell them apart on " + ", ".join(unclear))
        if n is not None:
            parts[-1] += f" (judge's grades, paired over {n} prompts)"
        words = differences[key].get("words")
        if words and words["mean"] is not None:
            parts.append(f"reply length, {a} minus {b}: {metrics.interval_text(words, 1, signed=True)} words "
                         f"(n={words['n']})")
        out.append(f"{key}: " + "; ".join(parts) + "." if parts else f"{key}: nothing to compare.")
    return out


# --------------------------------------------------------------------------- tables (notebook 03)


def quality_table(result: dict):
    """Judge grades and reply length per variant: mean [95% interval], and n."""
    import pandas as pd

    ci = metrics.interval_text
    return pd.DataFrame({
        name: {"Overall /5": ci(s["overall"]), "Relevance /5": ci(s["relevance"]), "Coherence /5": ci(s["coherence"]),
               "Avg Len (words)": ci(s["words"], 1), "n": s["words"]["n"]}
        for name, s in result["summary"].items()}).T


def signals_table(result: dict):
    """The cheap signals, which are not part of the grades, and the held-out loss."""
    import pandas as pd

    ci = metrics.interval_text

    def loss(name):
        heldout = result["variants"][name]["heldout"]
        return f"{heldout['loss']:.3f}" if heldout else "–"

    return pd.DataFrame({
        name: {"distinct-2": ci(s["distinct_2"]), "prompt similarity": ci(s["prompt_similarity"]),
               "ROUGE-L": ci(s["rouge_l"], 3), "chrF": ci(s["chrf"], 1), "reference similarity": ci(s["similarity"], 3),
               "held-out loss": loss(name)}
        for name, s in result["summary"].items()}).T


def pairwise_table(result: dict):
    import pandas as pd

    return pd.DataFrame([{"comparison": k, "win rate": metrics.interval_text(w, keys=WIN),
                          "length-controlled": metrics.interval_text(w.get("length_controlled"), keys=WIN),
                          "wins/ties/losses": f"{w['wins']}/{w['ties']}/{w['losses']}", "n": w["n"]}
                         for k, w in result["pairwise"].items()])


def differences_table(result: dict):
    """Paired grade differences (first model minus second) per comparison."""
    import pandas as pd

    return pd.DataFrame({k: {m: metrics.interval_text(d[m], signed=True) for m in d}
                         for k, d in result["grade_differences"].items()}).T


def validity_table(v: dict):
    """Share of known-order pairs the judge ranks right, per score and for good vs fluent-but-wrong."""
    import pandas as pd

    def row(score, share):
        return {"score": score, "ranked right": f"{100 * share['share']:.0f}%", "pairs": share["n"]}

    rows = [row(g, v["shares"][g]) for g in ("relevance", "coherence", "overall")]
    rows.append(row("good vs fluent-but-wrong", v["shares"]["good_vs_wrong"]))
    if v.get("pairwise"):
        rows.append(row("pairwise: good vs fluent-but-wrong", v["pairwise"]))
    return pd.DataFrame(rows)
