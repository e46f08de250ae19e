"""The PEFT sweep's grid, its checks before training, the Pareto front, the verdict, and that a
failing trial loses nothing (tiny random models; the real sweep runs in tests/functional/test_sweep.py)."""
import json

import pytest
import yaml

from tiny import save_tiny_model, write_splits
from utils import sweep
from utils.sweep import SweepError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-sweep")
    return {"llama": save_tiny_model(root / "llama", "llama"), "data": write_splits(root / "data")}


def _config(tmp_path, model, data, grid, **extra):
    doc = {"model": str(model), "study": "test", "seed": 0,
           "train": {"max_steps": 2, "batch_size": 4, "data_dir": str(data), "max_eval_examples": 4,
                     "report_to": "none"},
           "alpha_per_r": 2, "learning_rate": {m: 1e-2 for m in sweep.METHODS},
           "quality": {"judge": None, "prompts": 2, "max_new_tokens": 4}, "decode_tokens": 4, "grid": grid,
           "workers": {"heartbeat_s": 1, "grace_s": 3, "max_retry": 2}, **extra}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_the_default_grid_covers_every_method_rank_and_target_set():
    trials = sweep.expand_grid(sweep.load_config())
    keys = [t.key for t in trials]
    assert len(keys) == len(set(keys))
    assert {t.method for t in trials} == set(sweep.METHODS)
    assert sorted(t.r for t in trials if t.method == "lora" and t.targets == "default" and not t.rslora
                  and t.base == "fp32") == [1, 2, 4, 8, 16, 32, 64]
    assert {t.targets for t in trials if t.method == "lora"} == {"default", "attention", "all-linear"}
    assert any(t.rslora for t in trials) and any(t.base == "8bit" for t in trials)
    assert next(t for t in trials if t.method == "qlora").base == "nf4"


def test_quick_settings_replace_the_defaults():
    full, quick = sweep.load_config(), sweep.load_config(quick=True)
    assert quick["train"]["max_steps"] < full["train"]["max_steps"]
    assert quick["train"]["dtype"] == full["train"]["dtype"]  # keys quick does not name are kept
    assert quick["quality"]["judge"] is None and len(sweep.expand_grid(quick)) < len(sweep.expand_grid(full))


def test_lists_are_crossed_and_a_list_of_module_names_is_one_target_set(tmp_path, tiny):
    cfg = sweep.load_config(_config(tmp_path, tiny["llama"], tiny["data"], [
        {"method": "lora", "r": [2, 4], "targets": ["attention", "all-linear"]},
        {"method": "dora", "r": 4, "targets": ["q_proj", "k_proj"]},
    ]))
    keys = [t.key for t in sweep.expand_grid(cfg)]
    assert keys == ["lora-r2-attention", "lora-r2-all-linear", "lora-r4-attention", "lora-r4-all-linear",
                    "dora-r4-q_proj+k_proj"]


@pytest.mark.parametrize("entry,message", [
    ({"method": "adapters"}, r"grid\[0\]: method='adapters'; expected one of \['lora', 'dora', 'qlora', 'ia3'"),
    ({"method": "lora", "r": 0}, r"grid\[0\]: r=0; expected an integer > 0"),
    ({"method": "lora", "r": -4}, r"grid\[0\]: r=-4; expected an integer > 0"),
    ({"method": "lora", "r": "8"}, r"grid\[0\]: r='8'; expected an integer > 0"),
    ({"method": "lora", "r": 8, "targets": "mlp"}, r"targets='mlp'; expected one of \['default', 'attention'"),
    ({"method": "lora", "r": 8, "base": "int4"}, r"base='int4'; expected one of \['fp32', '8bit'\]"),
    ({"method": "lora", "r": 8, "alpha": 3}, r"unknown parameter \['alpha'\]"),
    ({"method": "ia3", "r": 8}, r"\['r'\] do not apply to method 'ia3'"),
    ({"method": "prompt", "virtual_tokens": 0}, r"virtual_tokens=0; expected an integer > 0"),
])
def test_a_bad_grid_entry_is_refused_naming_parameter_value_and_choices(tmp_path, tiny, entry, message):
    cfg = sweep.load_config(_config(tmp_path, tiny["llama"], tiny["data"], [entry]))
    with pytest.raises(SweepError, match=message):
        sweep.expand_grid(cfg)


def test_unknown_top_level_key_is_refused(tmp_path, tiny):
    path = _config(tmp_path, tiny["llama"], tiny["data"], [{"method": "full"}], steps=3)
    with pytest.raises(SweepError, match=r"unknown keys \['steps'\]"):
        sweep.load_config(path)


def test_a_target_module_the_model_lacks_is_refused_before_training(tmp_path, tiny):
    cfg = sweep.load_config(_config(tmp_path, tiny["llama"], tiny["data"], [
        {"method": "lora", "r": 4, "targets": "default"},
        {"method": "lora", "r": 4, "targets": ["q_proj", "c_attn"]}]))
    with pytest.raises(SweepError, match=r"(?s)refused before any training:\n  lora-r4-q_proj\+c_attn: target_modules "
                                         r"\['c_attn'\] not found.*linear modules of .*'q_proj'"):
        sweep.check_trials(cfg, sweep.expand_grid(cfg))
    assert not (tmp_path / "out").exists()


def test_a_method_peft_cannot_apply_to_the_architecture_is_refused(tmp_path, write_jsonl):
    """PEFT knows no IA3 layers for Phi-3 (it names none by default): refused on the model's skeleton."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from utils.models import byte_tokenizer

    folder = tmp_path / "phi3"
    config = AutoConfig.for_model("phi3", vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                  pad_token_id=0, bos_token_id=256, eos_token_id=256)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    cfg = sweep.load_config(_config(tmp_path, folder, tmp_path, [{"method": "ia3"}, {"method": "lora", "r": 2}]))
    with pytest.raises(SweepError, match=r"ia3: method 'ia3' cannot be applied to .*Phi3ForCausalLM"):
        sweep.check_trials(cfg, sweep.expand_grid(cfg))


def test_pareto_front():
    # (trainable parameters, quality): the cheapest point, a better dearer one, a dominated one, a tie
    points = [(10, 2.0), (100, 3.0), (1000, 2.5), (100, 3.0), (5, 1.0)]
    assert sweep.pareto_front(points) == [True, True, False, True, True]


def _record(key, method, params, grades, **kw):
    from utils.metrics import bootstrap_ci

    return {"key": key, "method": method, "r": kw.get("r"), "targets": kw.get("targets", ["q_proj", "v_proj"]),
            "targets_alias": kw.get("alias", "default"), "rslora": False, "base": "fp32", "trainable_params": params,
            "heldout_loss": 2.0, "heldout_loss_start": 3.0, "grades": grades, "quality": bootstrap_ci(grades),
            "steps": 20, "pareto": kw.get("pareto", False)}


def test_the_verdict_names_what_the_data_cannot_tell_apart_and_measures_the_99_percent_claim():
    good = [5, 5, 4, 5, 5, 4, 5, 5, 4, 5]
    doc = {"config": {"seed": 0}, "failed": [], "trials": [
        _record("full", "full", 100_000, good, pareto=True),
        _record("lora-r8-default", "lora", 1_000, [5, 4, 4, 5, 5, 4, 5, 4, 4, 5], r=8, pareto=True),
        _record("ia3", "ia3", 10, [1, 1, 2, 1, 1, 1, 2, 1, 1, 1], pareto=True),
        {**_record("prefix-16tok", "prefix", 50, [5] * 10), "ranked": False, "same_as_base": True,
         "unranked_because": sweep.UNRANKED["prefix"]},
    ]}
    text = " ".join(sweep.verdict(doc))
    assert "Best judged quality: **full**" in text
    assert "not distinguishable from it on this suite: lora-r8-default." in text
    assert "Below it: ia3." in text
    assert ("Not ranked: prefix-16tok (judged 5.00 [5.00, 5.00], held-out loss 2.000): generate() did not apply "
            "the learned prefix (replies identical to the base model's) (measured here: identical") in text
    assert "LoRA r=8 on q_proj, v_proj trains 1.00% of the parameters full fine-tuning trains (99.00% fewer)" in text
    # mean 4.5 vs 4.7: 0.96 of full fine-tuning's quality, with a bootstrap interval around it
    assert "reaches 0.96 [" in text


def test_a_failing_trial_loses_no_finished_trial_and_is_run_again_next_time(tmp_path, tiny, monkeypatch):
    path = _config(tmp_path, tiny["llama"], tiny["data"], [{"method": "lora", "r": [2, 4]}, {"method": "ia3"}])
    cfg = sweep.load_config(path)
    trials = sweep.expand_grid(cfg)
    out = tmp_path / "out"
    out.mkdir()
    ran = []

    def fake_run_trial(trial, cfg, out, judge):
        ran.append(trial.key)
        if trial.key == "lora-r4-default":
            raise RuntimeError("out of memory (simulated)")
        return {**_record(trial.key, trial.method, 10 * len(ran), [3.0]), "quality": None, "grades": []}

    monkeypatch.setattr(sweep, "run_trial", fake_run_trial)
    url = sweep.storage_url(out, None)
    sweep.work(cfg, trials, out, url, log=lambda *a: None)
    doc = json.loads((out / "sweep.json").read_text())
    assert sorted(t["key"] for t in doc["trials"]) == ["ia3", "lora-r2-default"]
    assert doc["failed"] == [{"key": "lora-r4-default", "trial": 1, "error": "RuntimeError: out of memory (simulated)"}]
    assert sorted(ran) == ["ia3", "lora-r2-default", "lora-r4-default"]

    ran.clear()
    monkeypatch.setattr(sweep, "run_trial", lambda trial, cfg, out, judge: (ran.append(trial.key), {
        **_record(trial.key, trial.method, 7, [3.0]), "quality": None, "grades": []})[1])
    sweep.work(cfg, trials, out, url, log=lambda *a: None)  # a second run: only the failed trial again
    assert ran == ["lora-r4-default"]
    doc = json.loads((out / "sweep.json").read_text())
    assert sorted(t["key"] for t in doc["trials"]) == ["ia3", "lora-r2-default", "lora-r4-default"]
    assert doc["failed"] == []
