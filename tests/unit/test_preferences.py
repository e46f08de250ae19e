"""Preference pairs (utils.preferences) and DPO on top of an SFT adapter (utils.dpo), on tiny random
models built here: which votes and verdicts become pairs, cleaning, the reference being the SFT model,
resume, and the DPO variant in the evaluation and the pipeline."""
import json
import math
from collections import Counter

import pytest
import torch

from tiny import Interrupt, save_tiny_model, write_splits
from utils import dpo, evaluation, models, pipeline, preferences, training
from utils.data import near_key
from utils.ratings import RatingStore
from utils.suite import load_domain_suite


def _vote(i, vote, a="reply one", b="reply two", prompt="How do I fix a dripping tap?"):
    return {"id": i, "vote": vote, "output_a": a, "output_b": b, "model_a": "m1", "model_b": "m2",
            "prompt": prompt, "created_utc": "2026-12-07T00:00:00+00:00"}


def test_only_votes_for_a_side_become_pairs_with_the_voted_reply_chosen():
    votes = [_vote(1, "A"), _vote(2, "B"), _vote(3, "tie"), _vote(4, "both_bad"), _vote(5, "A", a="same", b="same"),
             _vote(6, "B", a="", b="something")]
    pairs, left = preferences.pairs_from_votes(votes)
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == [
        ("reply one", "reply two"), ("reply two", "reply one")]
    assert [p["origin"]["chosen_model"] for p in pairs] == ["m1", "m2"]
    assert left == Counter({"arena vote tie": 1, "arena vote both_bad": 1, "arena: empty or identical replies": 2})
    assert all(p["source"] == "arena" and p["prompt"] == [{"role": "user", "content": "How do I fix a dripping tap?"}]
               for p in pairs)


class _OrderJudge:
    """Prefers the reply containing "good"; with "coin" in the prompt it always prefers the one shown
    first (position bias: the two orders disagree)."""

    def compare(self, prompt, a, b):
        if "coin" in prompt:
            first, second = 0.8, 0.2  # A shown first wins; B shown first wins
        else:
            first = 0.9 if "good" in a else 0.1
            second = first
        p = (first + second) / 2
        verdict = "A" if first > 0.5 and second > 0.5 else "B" if first < 0.5 and second < 0.5 else "tie"
        return {"p_a": p, "p_a_shown_first": first, "p_a_shown_second": second, "verdict": verdict}


def test_judge_pairs_keep_agreeing_verdicts_only():
    prompts = [[{"role": "user", "content": t}] for t in ("plan a trip", "toss a coin", "cook rice", "same")]
    first = ["a good plan", "heads", "burnt mess", "x"]
    second = ["no plan", "tails", "good rice", "x"]
    pairs, left = preferences.pairs_from_judge(_OrderJudge(), prompts, first, second)
    assert [(p["prompt"][-1]["content"], p["chosen"][0]["content"]) for p in pairs] == [
        ("plan a trip", "a good plan"), ("cook rice", "good rice")]
    assert left == Counter({"judge: the two orders disagree": 1, "judge: identical or empty candidates": 1})
    assert all(p["origin"]["p_chosen"] > 0.5 for p in pairs)


def test_cleaning_redacts_pii_and_removes_evaluation_leaks_and_repeats():
    suite_prompt = load_domain_suite()[0]["prompt"]
    leak = preferences._pair([{"role": "user", "content": suite_prompt.upper() + "!!"}], "a", "b", "arena", {})
    leak_in_reply = preferences._pair([{"role": "user", "content": "hi"}], "fine", suite_prompt, "judge", {})
    pii = preferences._pair([{"role": "user", "content": "mail me at jo.smith@example.com please"}],
                            "call 415-555-0134 now", "no", "arena", {})
    pairs, report = preferences.clean([leak, pii, dict(pii), leak_in_reply])
    assert len(pairs) == 1 and pairs[0]["id"] == "arena-00000"
    text = json.dumps(pairs[0])
    assert "jo.smith@example.com" not in text and "415-555-0134" not in text
    assert report["pii_redacted"] and report["repeats_removed"] == 1
    assert len(report["evaluation_leaks_removed"]) == 2
    assert all(near_key(x["evaluation_text"]) == near_key(suite_prompt) for x in report["evaluation_leaks_removed"])


def test_export_from_arena_votes_writes_pairs_and_card(tmp_path):
    db = tmp_path / "votes.sqlite"
    store = RatingStore(db)
    store.add_vote("Any tips for sleeping better?", "m1", "m2", "Keep a regular bedtime.", "Sleep is good.", "A")
    store.add_vote("Any tips for sleeping better?", "m1", "m2", "one", "two", "tie")
    store.add_vote(load_domain_suite()[1]["prompt"], "m1", "m2", "left", "right", "B")
    cfg = preferences.PairsConfig(source="arena", ratings_db=str(db), pairs_path=str(tmp_path / "p.jsonl"))
    card = preferences.export(cfg, log=lambda *a: None)
    pairs = preferences.read_pairs(tmp_path / "p.jsonl")
    assert len(pairs) == card["pairs"] == 1 and pairs[0]["chosen"][0]["content"] == "Keep a regular bedtime."
    assert card["by_source"] == {"arena": 1} and card["left_out"] == {"arena vote tie": 1}
    assert len(card["evaluation_leaks_removed"]) == 1 and not card["judge_used"]
    assert json.loads((tmp_path / "p.card.json").read_text())["pairs"] == 1


def test_a_malformed_pairs_file_is_refused_by_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "chosen": "a"}) + "\n")
    with pytest.raises(preferences.PreferenceError, match="line 2: expected"):
        preferences.read_pairs(path)
    with pytest.raises(preferences.PreferenceError, match="source="):
        preferences.PairsConfig(source="votes").validate()


# --------------------------------------------------------------------------- DPO on a tiny model


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """A tiny Llama with a trained SFT adapter under <root>/models, and a pairs file that prefers one
    kind of reply ("bird bird") over another."""
    root = tmp_path_factory.mktemp("dpo")
    base = save_tiny_model(root / "llama", "llama")
    data = write_splits(root / "data")
    out = root / "models" / "llama-lora"
    training.train(training.TrainConfig(model=str(base), data_dir=str(data), output_dir=str(out), load_in_8bit=False,
                                        max_steps=4, eval_steps=2, save_steps=2, batch_size=4, learning_rate=1e-2,
                                        report_to="none", lora_dropout=0.0), log=lambda *a: None)
    pairs = root / "pairs.jsonl"
    with open(pairs, "w") as fh:
        for i in range(30):
            fh.write(json.dumps({"prompt": [{"role": "user", "content": f"say bird {i}"}],
                                 "chosen": [{"role": "assistant", "content": "bird bird"}],
                                 "rejected": [{"role": "assistant", "content": "moon tree sun"}],
                                 "source": "judge"}) + "\n")
    return {"root": root, "base": base, "pairs": pairs}


def _dpo_cfg(sft, out, **kw):
    values = dict(model=str(sft["base"]), models_dir=str(sft["root"] / "models"), pairs_path=str(sft["pairs"]),
                  output_dir=str(out), max_steps=6, save_steps=2, batch_size=4, learning_rate=1e-2,
                  load_in_8bit=False, export_pairs=False, logging_steps=1, dtype="fp32")
    values.update(kw)
    return dpo.PreferenceNotebook(**values)


def test_dpo_starts_at_the_sft_model_and_learns_the_held_out_preference(sft, tmp_path):
    run = dpo.train(_dpo_cfg(sft, tmp_path / "dpo"), log=lambda *a: None)
    before, after = run["held_out_before"], run["held_out_after"]
    # the reference is the SFT adapter: before training policy == reference, so the loss is exactly log 2
    assert before["n"] == 3 and before["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert before["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert after["rewards/accuracies"] == 1.0 and after["rewards/margins"] > 0.1
    assert run["preference_pairs"]["train"] == 27 and run["global_step"] == 6
    assert run["trainable_params"] == models.read_run(sft["root"] / "models" / "llama-lora")["trainable_params"]
    # the result is an ordinary adapter: loads like the SFT one and differs from it
    tuned = models.load_finetuned(tmp_path / "dpo")
    config = json.loads((tmp_path / "dpo" / "final" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == models.read_run(sft["root"] / "models" / "llama-lora")["base_model"]
    assert not (tmp_path / "dpo" / "final" / "ref").exists()  # the frozen reference copy is not kept
    assert tuned.info["adapter"].endswith("final")
    assert (tmp_path / "dpo" / "dpo_curves.png").exists() and "DPO" in (tmp_path / "dpo" / "MODEL_CARD.md").read_text()
    assert "27 preference pairs" in dpo.summary(run)


def test_dpo_resumes_from_its_last_checkpoint(sft, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        dpo.train(_dpo_cfg(sft, tmp_path / "d"), log=lambda *a: None, extra_callbacks=[Interrupt(5)])
    assert (tmp_path / "d" / "checkpoint-4").exists() and not (tmp_path / "d" / "final").exists()
    run = dpo.train(_dpo_cfg(sft, tmp_path / "d"), log=lambda *a: None)
    assert run["resumed_from"] == "checkpoint-4" and run["global_step"] == 6


def test_dpo_refuses_missing_sft_adapter_and_too_few_pairs(sft, tmp_path):
    with pytest.raises(dpo.DPOError, match="no SFT adapter"):
        dpo.train(_dpo_cfg(sft, tmp_path / "x", models_dir=str(tmp_path / "empty")), log=lambda *a: None)
    one = tmp_path / "one.jsonl"
    one.write_text(sft["pairs"].read_text().splitlines()[0] + "\n")
    with pytest.raises(dpo.DPOError, match="1 preference pair"):
        dpo.train(_dpo_cfg(sft, tmp_path / "x", pairs_path=str(one)), log=lambda *a: None)
    with pytest.raises(dpo.DPOError, match="beta"):
        dpo.validate(_dpo_cfg(sft, tmp_path / "x", beta=0))


def test_the_evaluation_adds_the_dpo_variant_and_compares_it_with_sft(tmp_path):
    for folder in ("smollm2-135m-lora", "smollm2-135m-dpo"):
        (tmp_path / folder / "final").mkdir(parents=True)
        (tmp_path / folder / "final" / "adapter_config.json").write_text("{}")
    found = evaluation.variants("smollm2-135m", tmp_path)
    assert [v["kind"] for v in found] == ["base", "lora", "dpo"]
    pairs = evaluation.comparisons(found + evaluation.variants("gemma3-270m", tmp_path))
    assert ("smollm2-135m (DPO)", "smollm2-135m (LoRA)") in pairs
    assert ("smollm2-135m (LoRA)", "gemma3-270m (base)") in pairs  # the SFT versions still meet each other
    # the headline says whether DPO helped, with the pairs' source and count
    key = "smollm2-135m (DPO) vs smollm2-135m (LoRA)"
    win = {"n": 40, "win_rate": 0.7, "low": 0.6, "high": 0.8}
    diffs = {key: {"overall": {"mean": 0.3, "low": 0.1, "high": 0.5, "n": 40}}}
    info = {"smollm2-135m (DPO)": {"preference": {"n": 58, "train": 52, "by_source": {"judge": 56, "arena": 2}}}}
    lines = evaluation.headline([("smollm2-135m (DPO)", "smollm2-135m (LoRA)")], {key: win}, diffs,
                                variant_info=info)
    assert lines[0].startswith("Preference tuning smollm2-135m (DPO on 58 preference pairs from judge 56, arena 2, 52 "
                               "trained on) helped against its SFT adapter")


def test_the_pipeline_adds_a_preference_step_per_model_before_the_evaluation():
    config = {"models": ["smollm2-135m", "gemma3-270m"], "preference": {"num_prompts": 8}}
    steps = pipeline.plan(config)
    names = [s.name for s in steps]
    assert names.index("06_preference-gemma3-270m") < names.index("03_evaluate")
    assert names.index("02_train_lora-gemma3-270m") < names.index("06_preference-smollm2-135m")
    step = steps[names.index("06_preference-smollm2-135m")]
    assert step.parameters["num_prompts"] == 8 and step.parameters["model"] == "smollm2-135m"
    assert "06_preference-smollm2-135m" not in [s.name for s in pipeline.plan({"models": ["smollm2-135m"]})]
    with pytest.raises(pipeline.PipelineError, match="unknown parameter"):
        pipeline.plan({"models": ["smollm2-135m"], "preference": {"num_pairs": 8}})


def test_the_summary_says_how_often_the_judge_agreed_and_when_there_are_too_few_pairs(tmp_path):
    from utils import plots

    verdicts = [{"p_first_shown_first": 0.7, "p_first_shown_second": 0.6, "kept": True},
                {"p_first_shown_first": 0.6, "p_first_shown_second": 0.4, "kept": False},
                {"p_first_shown_first": 0.3, "p_first_shown_second": 0.7, "kept": False}]
    card = {"pairs": 1, "by_source": {"judge": 1}, "arena_votes": 0, "judge_used": True, "judge_prompts": 3,
            "judge_verdicts": verdicts}
    text = preferences.summary(card)
    assert "agreed on 1 of 3 candidate pairs (median preference 0.65" in text and "Too few pairs for DPO" in text
    assert "Too few" not in preferences.summary({**card, "pairs": 2, "by_source": {"judge": 2}})
    plots.plot_judge_pairs(verdicts, tmp_path / "j.png")
    assert (tmp_path / "j.png").stat().st_size > 0


def test_dpo_on_8bit_weights_trains_and_keeps_the_adapter_in_fp32(sft, tmp_path):
    # TRL casts a quantized model's LoRA weights to bf16, where small Adam steps round away; kept fp32
    run = dpo.train(_dpo_cfg(sft, tmp_path / "q", load_in_8bit=True, dtype="bf16"), log=lambda *a: None)
    assert run["load_in_8bit"] and run["dtype"] == "bf16"
    from safetensors.torch import load_file

    tuned = load_file(str(tmp_path / "q" / "final" / "adapter_model.safetensors"))
    sft_weights = load_file(str(sft["root"] / "models" / "llama-lora" / "final" / "adapter_model.safetensors"))
    assert {t.dtype for t in tuned.values()} == {torch.float32}
    assert max((tuned[k] - sft_weights[k]).abs().max().item() for k in tuned) > 1e-3  # DPO moved the adapter
