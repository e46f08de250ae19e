"""Preference pairs for DPO: ``{prompt, chosen, rejected}`` from blind-arena votes and from the
judge's position-swapped verdicts, cleaned the way the training data is (PII redacted, nothing
that copies an evaluation text).

    python -m utils.preferences export --model smollm2-135m            # source auto (see below)
    python -m utils.preferences export --model smollm2-135m --source arena --db data/ratings.sqlite

Where the pairs come from (``source``):
- ``arena``: every blind-arena vote that picked a side (A or B). Ties and "both bad" say nothing about
  which reply is better and are left out (counted).
- ``judge``: the fine-tuned (SFT) model samples two replies to each of ``num_prompts`` training
  prompts; the judge compares them in both orders (``LLMJudge.compare``) and a pair is kept only when
  both orders agree. When they disagree (the judge prefers whichever it reads first, or second) the
  pair is left out (counted as a disagreement). These are on-policy pairs: the replies are the ones
  the model itself gives, so DPO moves it between its own answers.
- ``both``: the union; ``auto``: arena votes when there are at least ``min_votes`` of them, else both
  (the votes there are, plus the judge's pairs). The card says which source gave how many pairs.

Format: one JSON object per line in TRL's conversational preference format, ``prompt`` the
conversation up to the user's turn (a list of messages), ``chosen`` and ``rejected`` one assistant
message each, plus ``id``, ``source`` and ``origin`` (vote id and models, or the judge's
probabilities). Beside it ``<name>.card.json``: counts by source, what was left out and why.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from . import pii
from .data import near_key, read_jsonl
from .io import write_json_atomically, write_text_atomically
from .paths import DATA_DIR, MODELS, PROCESSED, adapter_root, from_root, has_adapter, require, shown

SOURCES = ("auto", "arena", "judge", "both")
MIN_PAIRS = 2  # DPO trains on no fewer
PREFERENCES_DIR = "data/preferences"
DEFAULT_DB = DATA_DIR / "ratings.sqlite"


class PreferenceError(ValueError):
    pass


@dataclass
class PairsConfig:
    """How the preference pairs are made (``python -m utils.preferences export`` and notebook 06)."""

    model: str = "smollm2-135m"  # the model whose SFT adapter is preference-tuned (preset, folder or hub id)
    data_dir: str = PROCESSED  # output of 01_data_prep (the judge's pairs use its training prompts)
    models_dir: str = MODELS  # where the SFT adapter is (<models_dir>/<name>-lora)
    source: str = "auto"  # auto: the votes, and the judge pairs too when under min_votes; arena; judge; both
    ratings_db: str = "data/ratings.sqlite"  # the dashboard's blind-arena votes
    min_votes: int = 50  # auto: this many usable votes make the judge's pairs unnecessary
    num_prompts: int = 128  # training prompts the SFT model answers twice for the judge's pairs
    temperature: float = 0.9  # sampling of the two candidate replies
    top_p: float = 0.95  # nucleus sampling of the candidates
    max_new_tokens: int = 64  # candidate reply length cap (as in the evaluation)
    judge_model: str = "qwen2.5-coder-1.5b"  # the judge that compares the two candidates (both orders)
    judge_dtype: str = "auto"  # auto (bf16 where the CPU has it natively, else fp32), fp32, bf16
    pairs_path: str | None = None  # None: data/preferences/<name>.jsonl
    seed: int = 42  # prompt sample and sampling seed

    def validate(self) -> None:
        if self.source not in SOURCES:
            raise PreferenceError(f"source={self.source!r}; expected one of {list(SOURCES)}")
        for name in ("min_votes", "num_prompts", "max_new_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise PreferenceError(f"{name}={getattr(self, name)!r}; expected an integer >= 0")
        if not 0 < self.temperature <= 2:
            raise PreferenceError(f"temperature={self.temperature!r}; expected 0 < temperature <= 2")
        if not 0 < self.top_p <= 1:
            raise PreferenceError(f"top_p={self.top_p!r}; expected 0 < top_p <= 1")


def default_pairs_path(model: str) -> Path:
    from .models import resolve

    return from_root(PREFERENCES_DIR) / f"{resolve(model)['name']}.jsonl"


def pairs_path(cfg: PairsConfig) -> Path:
    return from_root(cfg.pairs_path) if cfg.pairs_path else default_pairs_path(cfg.model)


def card_path(path: Path) -> Path:
    return path.with_suffix(".card.json")


# --------------------------------------------------------------------------- the two sources


def _pair(prompt: list[dict], chosen: str, rejected: str, source: str, origin: dict) -> dict:
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], "source": source, "origin": origin}


def pairs_from_votes(votes: Sequence[dict]) -> tuple[list[dict], Counter]:
    """A pair per vote for A or B (the voted side chosen); ties, "both bad", empty or identical replies
    are left out and counted by reason."""
    pairs, left = [], Counter()
    for v in votes:
        if v["vote"] not in ("A", "B"):
            left[f"arena vote {v['vote']}"] += 1
            continue
        a, b = (v["output_a"] or "").strip(), (v["output_b"] or "").strip()
        if not a or not b or a == b:
            left["arena: empty or identical replies"] += 1
            continue
        win, lose = (a, b) if v["vote"] == "A" else (b, a)
        models = (v["model_a"], v["model_b"]) if v["vote"] == "A" else (v["model_b"], v["model_a"])
        pairs.append(_pair([{"role": "user", "content": v["prompt"]}], win, lose, "arena",
                           {"vote_id": v["id"], "chosen_model": models[0], "rejected_model": models[1],
                            "created_utc": v["created_utc"]}))
    return pairs, left


def pairs_from_judge(judge, prompts: Sequence[list[dict]], first: Sequence[str], second: Sequence[str],
                     progress: Callable | None = None, record: list | None = None) -> tuple[list[dict], Counter]:
    """A pair per prompt whose two candidate replies the judge ranks the same way in both orders
    (``verdict`` A or B); a tie (the orders disagree) and identical or empty candidates are left out.
    ``record``: a list that gets each comparison's two probabilities and whether it was kept."""
    from .judge import compare_all

    left = Counter()
    todo = []
    for messages, a, b in zip(prompts, first, second):
        if not a.strip() or not b.strip() or a.strip() == b.strip():
            left["judge: identical or empty candidates"] += 1
        else:
            todo.append((messages, a.strip(), b.strip()))
    verdicts = compare_all(judge, [(m[-1]["content"], a, b) for m, a, b in todo], progress)
    pairs = []
    for (messages, a, b), v in zip(todo, verdicts):
        if record is not None:
            record.append({"p_first_shown_first": round(v["p_a_shown_first"], 4),
                           "p_first_shown_second": round(v["p_a_shown_second"], 4), "kept": v["verdict"] != "tie"})
        if v["verdict"] == "tie":
            left["judge: the two orders disagree"] += 1
            continue
        win, lose = (a, b) if v["verdict"] == "A" else (b, a)
        p = v["p_a"] if v["verdict"] == "A" else 1 - v["p_a"]
        pairs.append(_pair(messages, win, lose, "judge",
                           {"p_chosen": round(p, 4), "p_first_shown_first": round(v["p_a_shown_first"], 4),
                            "p_first_shown_second": round(v["p_a_shown_second"], 4)}))
    return pairs, left


# --------------------------------------------------------------------------- cleaning


def _texts(pair: dict) -> list[str]:
    return [m["content"] for m in pair["prompt"]] + [pair["chosen"][0]["content"], pair["rejected"][0]["content"]]


def clean(pairs: Sequence[dict], evaluation: dict[str, tuple[str, str]] | None = None) -> tuple[list[dict], dict]:
    """Pairs with PII redacted (``utils.pii``, as the data), without those that copy an evaluation text
    (any turn, ``near_key``: the leakage check of the data) and without repeats; ids assigned.
    Returns the pairs and a report (redactions by kind, the leaks removed with the file they copy)."""
    from .data import evaluation_texts

    evaluation = evaluation_texts() if evaluation is None else evaluation
    redactions: Counter = Counter()
    kept, leaks, seen, repeats = [], [], set(), 0
    for pair in pairs:
        hit = next((evaluation[near_key(t)] for t in _texts(pair) if near_key(t) in evaluation), None)
        if hit is not None:
            leaks.append({"source": pair["source"], "evaluation_file": hit[0], "evaluation_text": hit[1]})
            continue
        pair = {**pair, "prompt": [{**m, "content": pii.redact(m["content"], redactions)[0]} for m in pair["prompt"]],
                **{side: [{"role": "assistant", "content": pii.redact(pair[side][0]["content"], redactions)[0]}]
                   for side in ("chosen", "rejected")}}
        key = json.dumps([near_key(t) for t in _texts(pair)])
        if key in seen:
            repeats += 1
            continue
        seen.add(key)
        kept.append(pair)
    for i, pair in enumerate(kept):
        pair["id"] = f"{pair['source']}-{i:05d}"
    return kept, {"pii_redacted": dict(redactions), "evaluation_leaks_removed": leaks, "repeats_removed": repeats}


# --------------------------------------------------------------------------- export


def read_votes(db: str | Path) -> list[dict]:
    """The arena's votes (none when the store does not exist yet)."""
    from .ratings import RatingStore

    path = from_root(db)
    return RatingStore(path).votes() if path.exists() else []


def train_prompts(cfg: PairsConfig) -> list[list[dict]]:
    """A seeded sample of ``num_prompts`` training conversations, each cut before its last reply."""
    from . import chat

    rows = read_jsonl(require(from_root(cfg.data_dir) / "train.jsonl", "01_data_prep.ipynb", PreferenceError))
    idx = sorted(random.Random(cfg.seed).sample(range(len(rows)), min(cfg.num_prompts, len(rows))))
    return [chat.split_prompt(rows[i])[0] for i in idx]


def candidates(cfg: PairsConfig, prompts: Sequence[list[dict]], log=print) -> tuple[list[str], list[str]]:
    """Two sampled replies of the SFT model (adapter merged) to each prompt."""
    from . import chat, generation, hardware, models

    root = adapter_root(models.resolve(cfg.model)["name"], cfg.models_dir)
    if not has_adapter(root):
        raise PreferenceError(f"no SFT adapter for {cfg.model} under {shown(from_root(cfg.models_dir))}: run "
                              "notebooks/02_train_lora.ipynb first (DPO starts from it, and its replies make the "
                              "judge's pairs)")
    loaded = models.load_finetuned(root, merge=True)
    import torch

    if hardware.pick_dtype("auto", "generation", allowed=hardware.COMPUTE_DTYPES) == "bf16":
        loaded.model.to(torch.bfloat16)
    fmt = chat.chat_format(loaded.spec, loaded.tokenizer)
    out = []
    for k in (0, 1):
        log(f"sampling candidate reply {k + 1} of 2 to {len(prompts)} training prompts ({cfg.model} + SFT adapter, "
            f"temperature {cfg.temperature}) ...")
        gens = generation.generate_batch(loaded.model, loaded.tokenizer, prompts, fmt, cfg.max_new_tokens,
                                         sample={"temperature": cfg.temperature, "top_p": cfg.top_p,
                                                 "seed": cfg.seed + k})
        out.append([g.text for g in gens])
    return out[0], out[1]


def export(cfg: PairsConfig, judge=None, log=print) -> dict:
    """Make the pairs for ``cfg`` and write them (JSONL) with their card; returns the card.
    ``judge``: an already loaded judge (else ``cfg.judge_model`` is loaded when the judge's pairs
    are needed)."""
    from tqdm.auto import tqdm

    cfg.validate()
    votes = read_votes(cfg.ratings_db)
    arena, left = pairs_from_votes(votes) if cfg.source != "judge" else ([], Counter())
    use_judge = cfg.source in ("judge", "both") or (cfg.source == "auto" and len(arena) < cfg.min_votes)
    log(f"{len(votes)} arena votes in {shown(from_root(cfg.ratings_db))}: {len(arena)} usable pairs"
        + (f"; below min_votes={cfg.min_votes}, so the judge's pairs are added" if cfg.source == "auto" and use_judge
           else ""))
    judged: list[dict] = []
    compared: list[dict] = []
    if use_judge and cfg.num_prompts:
        prompts = train_prompts(cfg)
        first, second = candidates(cfg, prompts, log)
        if judge is None:
            from .judge import LLMJudge

            judge = LLMJudge(cfg.judge_model, dtype=cfg.judge_dtype)
        log(f"the judge ({cfg.judge_model}) compares the two candidates of {len(prompts)} prompts in both orders ...")
        judged, left_j = pairs_from_judge(judge, prompts, first, second,
                                          lambda it: tqdm(it, desc="judging candidate pairs", unit="batch"),
                                          compared)
        left += left_j
    pairs, cleaning = clean(arena + judged)
    path = pairs_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    card = {"pairs": len(pairs), "file": shown(path), "by_source": dict(Counter(p["source"] for p in pairs)),
            "source_setting": cfg.source, "arena_votes": len(votes), "judge_used": use_judge,
            "judge_prompts": cfg.num_prompts if use_judge else 0, "left_out": dict(left), **cleaning,
            "judge_verdicts": compared, "config": asdict(cfg)}
    write_json_atomically(card_path(path), card)
    log(f"{len(pairs)} preference pairs ({', '.join(f'{k} {v}' for k, v in card['by_source'].items()) or 'none'}) "
        f"-> {shown(path)}; left out: {dict(left) or 'nothing'}; evaluation leaks removed: "
        f"{len(cleaning['evaluation_leaks_removed'])}")
    return card


def summary(card: dict) -> str:
    """What the pair-making found (markdown): pairs by source, and how often the judge's two orders agreed."""
    sources = ", ".join(f"{v} from the {k}" for k, v in card["by_source"].items()) or "none"
    lines = [f"**{card['pairs']} preference pairs** ({sources}) from {card['arena_votes']} arena votes"
             + (f" and {card['judge_prompts']} training prompts answered twice" if card.get("judge_used") else "")
             + "."]
    verdicts = card.get("judge_verdicts") or []
    if verdicts:
        kept = sum(v["kept"] for v in verdicts)
        strength = sorted(abs((v["p_first_shown_first"] + v["p_first_shown_second"]) / 2 - 0.5)
                          for v in verdicts if v["kept"])
        lines.append(f"The judge's two orders agreed on {kept} of {len(verdicts)} candidate pairs"
                     + (f" (median preference {0.5 + strength[len(strength) // 2]:.2f} for the chosen reply)"
                        if strength else "")
                     + "; the rest, where it prefers whichever reply it reads first (or second), are left out.")
    if card["pairs"] < MIN_PAIRS:
        lines.append(f"Too few pairs for DPO (it needs at least {MIN_PAIRS}): vote in the dashboard's blind arena, "
                     "or raise num_prompts.")
    return " ".join(lines)


def read_pairs(path: str | Path) -> list[dict]:
    """Pairs from a JSONL file, each checked: a clear error names the line and what was expected."""
    path = from_root(path)
    if not path.exists():
        raise PreferenceError(f"{shown(path)} not found: make the pairs first (python -m utils.preferences export, "
                              "or notebook 06 with export_pairs=True)")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            p = json.loads(line)
            ok = (isinstance(p.get("prompt"), list) and p["prompt"] and p["prompt"][-1].get("role") == "user"
                  and all(isinstance(p.get(s), list) and len(p[s]) == 1 and p[s][0].get("role") == "assistant"
                          and isinstance(p[s][0].get("content"), str) for s in ("chosen", "rejected")))
        except (ValueError, AttributeError, TypeError):
            ok = False
        if not ok:
            raise PreferenceError(f"{shown(path)} line {n}: expected a JSON object with prompt (messages ending with "
                                  "a user turn) and chosen/rejected (one assistant message each)")
        out.append(p)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    import dataclasses

    parser = argparse.ArgumentParser(prog="python -m utils.preferences", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write the preference pairs of one model (JSONL + card)")
    for f in dataclasses.fields(PairsConfig):
        kind = {"int": int, "float": float}.get(str(f.type), str)
        ex.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default)
    args = vars(parser.parse_args(argv))
    args.pop("command")
    try:
        card = export(PairsConfig(**args))
    except PreferenceError as err:
        print(f"python -m utils.preferences: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: card[k] for k in ("pairs", "by_source", "file", "left_out")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
