"""LoRA training on tiny random GPT-2 and Llama models (same code paths as the real presets)."""
import json
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tiny import Interrupt, save_tiny_model, write_splits
from utils import chat, models, training
from utils.training import TrainConfig, TrainingError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"gpt2": save_tiny_model(root / "gpt2", "gpt2"), "llama": save_tiny_model(root / "llama", "llama"),
            "data": write_splits(root / "data")}


def _cfg(tiny, arch, out, **kw):
    base = dict(model=str(tiny[arch]), data_dir=str(tiny["data"]), output_dir=str(out), load_in_8bit=False,
                max_steps=6, eval_steps=2, save_steps=2, batch_size=4, learning_rate=1e-2, lora_dropout=0.0,
                logging_steps=1)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_few_steps_lower_the_loss_and_write_the_artefacts(tiny, tmp_path, arch):
    res = training.train(
        _cfg(tiny, arch, tmp_path / "out", max_steps=24, eval_steps=6, save_steps=6, learning_rate=3e-2)
    )
    val = [p["loss"] for p in res.run["loss_history"]["validation"]]
    # step 0 is the untrained model (eval_on_start), then every 6 steps
    assert [p["step"] for p in res.run["loss_history"]["validation"]] == [0, 6, 12, 18, 24]
    assert val[-1] < val[0] - 0.5
    final = tmp_path / "out" / "final"
    assert (final / "adapter_model.safetensors").exists() and (final / "adapter_config.json").exists()
    assert not list(final.glob("*.bin")) and not list(final.glob("*.pt"))
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["trainable_params"] == res.run["trainable_params"] > 0
    assert run["train_tokens"] > 0 and run["train_tokens_per_s"] > 0
    assert run["best_eval_loss"] == pytest.approx(min(val))
    assert (tmp_path / "out" / "loss_curves.png").stat().st_size > 1000
    card = (tmp_path / "out" / "MODEL_CARD.md").read_text()
    assert "| Fine-Tuning | LoRA r=8" in card and "| Limitations |" in card


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_label_mask_covers_only_assistant_tokens(tiny, arch):
    tok = models.load_model(str(tiny[arch])).tokenizer
    messages = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hello there"},
                {"role": "assistant", "content": "hi!"}, {"role": "user", "content": "and?"},
                {"role": "assistant", "content": "bye"}]
    enc = chat.encode(messages, tok, "plain", 512)
    trained = tok.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab != chat.IGNORE_INDEX])
    assert trained == "hi!<|endoftext|>bye<|endoftext|>"
    assert enc.labels[: enc.prompt_tokens] == [chat.IGNORE_INDEX] * enc.prompt_tokens
    # padding added by the collator is masked too
    from transformers import DataCollatorForSeq2Seq

    rows, _ = chat.encode_rows([{"messages": messages}, {"messages": messages[1:3]}], tok, "plain", 512)
    batch = DataCollatorForSeq2Seq(tok, label_pad_token_id=-100)(
        [{k: r[k] for k in ("input_ids", "attention_mask", "labels")} for r in rows]
    )
    pad = batch["attention_mask"] == 0
    assert pad.any() and (batch["labels"][pad] == -100).all()


def _adapter(path, folder="final"):
    return load_file(str(path / folder / "adapter_model.safetensors"))


def _train_losses(run):
    return [(h["step"], h["loss"]) for h in run["loss_history"]["train"]]


@pytest.mark.parametrize("seed", [0, 1])
def test_interrupted_and_resumed_run_equals_uninterrupted(tiny, tmp_path, seed):
    steps = 8
    kill = random.Random(seed).randrange(3, steps)  # any step after the first checkpoint, save step or not
    last = 2 * ((kill - 1) // 2)  # the newest checkpoint written before the kill (save_steps=2)
    print(f"seed {seed}: interrupted after step {kill}; the newest checkpoint then is checkpoint-{last}")
    full = training.train(_cfg(tiny, "llama", tmp_path / "a", max_steps=steps))
    with pytest.raises(KeyboardInterrupt):
        training.train(_cfg(tiny, "llama", tmp_path / "b", max_steps=steps), extra_callbacks=[Interrupt(kill)])
    assert not (tmp_path / "b" / "final").exists()
    assert max(int(p.name.split("-")[1]) for p in (tmp_path / "b").glob("checkpoint-*")) == last

    resumed = training.train(_cfg(tiny, "llama", tmp_path / "b", max_steps=steps, resume=True))
    assert resumed.run["resumed_from"] == f"checkpoint-{last}"
    assert resumed.run["steps_this_session"] == steps - last  # only the remaining steps ran
    assert full.run["steps_this_session"] == steps and resumed.run["global_step"] == steps
    # the last checkpoint's weights (final/ holds the *best* one, which may predate the kill)
    a, b = _adapter(tmp_path / "a", f"checkpoint-{steps}"), _adapter(tmp_path / "b", f"checkpoint-{steps}")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    # the whole train-loss history, value by value: the steps before the kill come from the first
    # process's checkpoint, the rest from the resumed one
    assert [s for s, _ in _train_losses(resumed.run)] == list(range(1, steps + 1))
    assert [loss for _, loss in _train_losses(resumed.run)] == pytest.approx(
        [loss for _, loss in _train_losses(full.run)], rel=1e-6)
    assert resumed.run["best_eval_loss"] == pytest.approx(full.run["best_eval_loss"], abs=1e-6)


def _tear(kind, folder):
    if kind == "missing state":
        (folder / "trainer_state.json").unlink()
    elif kind == "truncated weights":
        weights = folder / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    elif kind == "missing optimizer state":
        (folder / "optimizer.pt").unlink()
    elif kind == "empty folder":
        for f in folder.iterdir():
            f.unlink() if f.is_file() else shutil.rmtree(f)


@pytest.mark.parametrize("kind", ["missing state", "truncated weights", "missing optimizer state", "empty folder"])
def test_each_kind_of_torn_checkpoint_is_skipped_and_kept(tiny, tmp_path, kind):
    out = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        training.train(_cfg(tiny, "llama", out), extra_callbacks=[Interrupt(5)])  # checkpoints 2 and 4
    assert training.checkpoint_is_complete(out / "checkpoint-4")
    _tear(kind, out / "checkpoint-4")
    assert not training.checkpoint_is_complete(out / "checkpoint-4")
    left = sorted(p.name for p in (out / "checkpoint-4").iterdir())
    logs = []
    res = training.train(_cfg(tiny, "llama", out, resume=True), log=logs.append)
    assert res.run["resumed_from"] == "checkpoint-2" and res.run["steps_this_session"] == 4
    assert any("checkpoint-4 is incomplete" in line for line in logs)
    assert sorted(p.name for p in (out / "torn-checkpoint-4").iterdir()) == left  # kept as it was
    assert res.run["global_step"] == 6


def test_an_earlier_torn_checkpoint_is_never_deleted(tiny, tmp_path):
    out = tmp_path / "d"
    earlier = out / "torn-checkpoint-4"
    earlier.mkdir(parents=True)
    (earlier / "note.txt").write_text("moved aside by an earlier run")
    with pytest.raises(KeyboardInterrupt):
        training.train(_cfg(tiny, "llama", out), extra_callbacks=[Interrupt(5)])
    _tear("missing state", out / "checkpoint-4")
    res = training.train(_cfg(tiny, "llama", out, resume=True), log=lambda *a: None)
    assert res.run["resumed_from"] == "checkpoint-2"
    assert (earlier / "note.txt").read_text() == "moved aside by an earlier run"
    assert (out / "torn-checkpoint-4.2" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_8bit_path(tiny, tmp_path, arch, monkeypatch):
    from utils import system

    # the lean allocator is real (tests/unit/test_system.py); here, leave this test process's alone
    monkeypatch.setattr(system, "lean_allocator", lambda: "lean (recorded)")
    lean = arch == "llama"
    res = training.train(_cfg(tiny, arch, tmp_path / "q", load_in_8bit=True, max_steps=4, lean_allocator=lean))
    assert res.run["load_in_8bit"] is True and res.run["load_in_8bit_fallback"] is None
    assert res.run["allocator"] == ("lean (recorded)" if lean else "default")
    loaded = models.load_model(str(tiny[arch]), load_in_8bit=True)
    kinds = {type(m).__name__ for m in loaded.model.modules()}
    assert "Linear8bitLt" in kinds


def test_8bit_failure_falls_back_loudly(tiny, tmp_path, monkeypatch, capsys):
    import transformers

    class Broken:
        def __init__(self, *a, **k):
            raise RuntimeError("no 8-bit kernels here")

    monkeypatch.setattr(transformers, "BitsAndBytesConfig", Broken)
    res = training.train(_cfg(tiny, "llama", tmp_path / "f", load_in_8bit=True, max_steps=2))
    assert res.run["load_in_8bit"] is False
    assert "no 8-bit kernels here" in res.run["load_in_8bit_fallback"]
    assert "8-bit loading failed" in capsys.readouterr().out


def test_adapter_loads_with_the_usage_example_and_refuses_another_base(tiny, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    training.train(_cfg(tiny, "llama", tmp_path / "u", max_steps=2))
    base = AutoModelForCausalLM.from_pretrained(str(tiny["llama"]))
    model = PeftModel.from_pretrained(base, str(tmp_path / "u" / "final"))
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0
    loaded = models.load_finetuned(tmp_path / "u")
    assert loaded.info["adapter"].endswith("final")
    other = models.load_model(str(tiny["gpt2"]))
    with pytest.raises(models.ModelError, match=r"was trained on base '.*llama', but the loaded base is '.*gpt2'"):
        models.check_adapter_matches(tmp_path / "u" / "final", other)


def test_lora_parameter_count_formula(tiny):
    from peft import get_peft_model

    loaded = models.load_model(str(tiny["llama"]))
    cfg = TrainConfig(lora_r=4)
    expected = training.expected_lora_params(loaded.model, ["q_proj", "v_proj"], 4)
    # q: 32 -> 32, v: 32 -> 16 (2 KV heads of 8), 2 layers
    assert expected == 4 * ((32 + 32) + (32 + 16)) * 2
    model = get_peft_model(loaded.model, training.lora_config(cfg, ["q_proj", "v_proj"], False))
    assert training.count_parameters(model)["trainable_params"] == expected


def _meta_model(architecture: str):
    """The shipped architecture built on the meta device: shapes and counts, no memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = json.loads((models.CONFIGS_DIR / "architectures" / architecture).read_text())
    arch.pop("_comment")
    config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def test_gpt2_124m_c_attn_r8_trains_294912_parameters():
    from peft import get_peft_model

    model = _meta_model("gpt2-124m.json")
    assert sum(p.numel() for p in model.parameters()) == 124_439_808
    peft_model = get_peft_model(model, training.lora_config(TrainConfig(lora_r=8), ["c_attn"], True))
    counts = training.count_parameters(peft_model)
    assert counts["trainable_params"] == 12 * 8 * (768 + 2304) == 294_912
    assert counts["trainable_percent"] < 1  # "~99% fewer"


def test_tinyllama_architecture_has_the_published_size():
    model = _meta_model("tinyllama-1.1b.json")
    assert sum(p.numel() for p in model.parameters()) == 1_100_048_384


# --------------------------------------------------------------------------- bad input


def test_unknown_model_lists_presets():
    with pytest.raises(
        models.ModelError,
        match=r"unknown model 'gpt-5'; presets: "
        r"\['gemma3-270m', 'gpt2', 'qwen2.5-coder-1.5b', 'smollm2-135m', 'tinyllama'\]",
    ):
        models.resolve("gpt-5")


def test_unreachable_hub_model_names_offline_presets():
    with pytest.raises(
        models.ModelError,
        match=r"cannot load 'openai-community/gpt2'.*"
        r"Offline presets: \['gemma3-270m', 'qwen2.5-coder-1.5b', 'smollm2-135m'\]",
    ):
        models.load_model("gpt2")


def test_unknown_target_module_lists_linear_modules(tiny, tmp_path):
    with pytest.raises(
        TrainingError,
        match=r"target_modules \['query'\] not found in .*; its linear modules are "
        r"\['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj'\]",
    ):
        training.train(_cfg(tiny, "llama", tmp_path / "t", target_modules=["query"]))


def test_missing_processed_data_names_the_notebook(tiny, tmp_path):
    cfg = _cfg(tiny, "llama", tmp_path / "o", data_dir=str(tmp_path / "nothing"))
    for call in (training.train, training.check_inputs):
        with pytest.raises(TrainingError, match=r"run notebooks/01_data_prep.ipynb first \(no .*train.jsonl\)"):
            call(cfg)


@pytest.mark.parametrize("kw, message", [
    ({"lora_r": 0}, r"lora_r=0; expected an integer > 0"),
    ({"lora_dropout": 1.0}, r"lora_dropout=1.0; expected 0 <= dropout < 1"),
    ({"save_steps": 3, "eval_steps": 2}, r"save_steps=3 must be a multiple of eval_steps=2"),
    ({"max_seq_len": 4}, r"max_seq_len=4; expected >= 8"),
    ({"lean_allocator": "yes"}, r"lean_allocator='yes'; expected True or False"),
    ({"dtype": "fp16"}, r"dtype='fp16'; expected one of \['auto', 'fp32', 'bf16'\]"),
    ({"peft_method": "adapters"}, r"peft_method='adapters'; expected one of \['lora', 'dora', 'ia3', 'prefix'"),
    ({"peft_method": "full", "load_in_8bit": True}, r"peft_method='full' trains every weight.*load_in_8bit=False"),
    ({"load_in_8bit": True, "load_in_4bit": True}, r"load_in_8bit and load_in_4bit are both True"),
    ({"peft_method": "prompt", "num_virtual_tokens": 0}, r"num_virtual_tokens=0; expected an integer > 0"),
    ({"report_to": "wandb"}, r"report_to='wandb'; expected one of \['tensorboard', 'none'\]"),
])
def test_impossible_settings_refused_before_work(tiny, tmp_path, kw, message):
    with pytest.raises(TrainingError, match=message):
        training.train(_cfg(tiny, "llama", tmp_path / "x", **kw))
    assert not (tmp_path / "x").exists()


def test_max_seq_len_below_every_prompt(tiny, tmp_path):
    with pytest.raises(TrainingError, match=r"max_seq_len=10 is shorter than every prompt \(median prompt \d+ tokens"):
        training.train(_cfg(tiny, "llama", tmp_path / "y", max_seq_len=10))


def test_pickle_only_model_folder_is_refused(tiny, tmp_path):
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(tiny["llama"], folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(models.ModelError, match=r"no safetensors weights \(only pickle files \['pytorch_model.bin'\]"):
        models.resolve(str(folder))


def test_adapter_without_safetensors_is_refused(tiny, tmp_path):
    training.train(_cfg(tiny, "llama", tmp_path / "p", max_steps=2))
    final = tmp_path / "p" / "final"
    (final / "adapter_model.safetensors").rename(final / "adapter_model.bin")
    with pytest.raises(models.ModelError, match="no adapter_model.safetensors"):
        models.load_finetuned(tmp_path / "p")


def test_full_disk_is_refused_before_training_and_keeps_the_previous_adapter(tiny, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    out = tmp_path / "d"
    training.train(_cfg(tiny, "llama", out, max_steps=2))
    before = (out / "final" / "adapter_model.safetensors").read_bytes()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(TrainingError, match=r"not enough free space in .*: about \d+ MB needed .*, 1 MB free"):
        training.train(_cfg(tiny, "llama", out, max_steps=4, resume=False))
    assert (out / "final" / "adapter_model.safetensors").read_bytes() == before


def test_unwritable_output_dir_is_refused(tiny, tmp_path, monkeypatch):
    import os

    target = tmp_path / "locked"
    real = os.access
    # root ignores permission bits, so the check is exercised through os.access itself
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(target) else real(p, mode))
    with pytest.raises(TrainingError, match=r"output_dir .*locked is not writable; expected a writable folder"):
        training.train(_cfg(tiny, "llama", target))


def test_adapter_with_matching_name_but_other_shapes_is_refused(tiny, tmp_path):
    import json as _json
    import shutil

    training.train(_cfg(tiny, "llama", tmp_path / "s", max_steps=2))
    # same folder name and base id, different architecture: a GPT-2 saved where the llama was
    other = tmp_path / "impostor"
    shutil.copytree(tiny["gpt2"], other)
    run = _json.loads((tmp_path / "s" / "run.json").read_text())
    run["config"]["model"] = str(other)
    (tmp_path / "s" / "run.json").write_text(_json.dumps(run))
    cfg_path = tmp_path / "s" / "final" / "adapter_config.json"
    cfg = _json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(other)
    cfg_path.write_text(_json.dumps(cfg))
    with pytest.raises(models.ModelError, match=r"does not fit base '.*impostor'"):
        models.load_finetuned(tmp_path / "s")


def test_remote_code_is_never_trusted():
    from pathlib import Path

    for path in (Path(models.__file__).parent).glob("*.py"):
        assert "trust_remote_code=True" not in path.read_text(), path


def test_cli_prints_bad_input_as_one_line_and_exits_2(capsys):
    assert training.main(["--lora-r", "0"]) == 2
    assert capsys.readouterr().err.strip() == "python -m utils.training: error: lora_r=0; expected an integer > 0"
    with pytest.raises(SystemExit) as exit_:
        training.main(["--load-in-8bit", "flase"])  # not silently False
    assert exit_.value.code == 2 and "'flase' is not a boolean; expected true or false" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_loss_at_labelled_positions_equals_the_models_own_loss_and_gradients(tiny, tmp_path, arch):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, TrainingArguments

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny[arch])
    targets = ["c_attn"] if arch == "gpt2" else ["q_proj", "v_proj"]
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0,
                                            init_lora_weights=False))  # B != 0, so every LoRA weight gets a gradient
    trainer = training._trainer_class()(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                                           report_to=[]))
    ids = torch.randint(0, 256, (3, 12))
    labels = ids.clone()
    labels[:, :5] = chat.IGNORE_INDEX  # the prompt
    labels[2, 9:] = chat.IGNORE_INDEX  # padding of a shorter row
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}

    expected = model(**batch).loss
    expected.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    ours = trainer.compute_loss(model, batch)
    ours.backward()
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    assert grads
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)
    n_labelled = int((labels[:, 1:] != chat.IGNORE_INDEX).sum())
    with_items = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(2 * n_labelled))
    torch.testing.assert_close(with_items, expected / 2)  # normalised by the tokens of the whole batch


@pytest.mark.parametrize("eight_bit", [False, True], ids=["fp32", "8bit"])
def test_gradient_checkpointing_trains_the_same_adapter(tiny, tmp_path, eight_bit):
    plain = training.train(
        _cfg(tiny, "llama", tmp_path / "plain", max_steps=4, load_in_8bit=eight_bit), log=lambda *a: None
    )
    ckpt = training.train(_cfg(tiny, "llama", tmp_path / "ckpt", max_steps=4, load_in_8bit=eight_bit,
                               gradient_checkpointing=True), log=lambda *a: None)
    assert ckpt.run["config"]["gradient_checkpointing"] and ckpt.run["load_in_8bit"] == eight_bit
    assert ckpt.run["checkpointing_active"] and not plain.run["checkpointing_active"]
    a, b = _adapter(plain.output_dir), _adapter(ckpt.output_dir)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    assert max(v.abs().max().item() for k, v in a.items() if "lora_B" in k) > 1e-3  # it did train
    assert ckpt.run["peak_train_rss_mb"] >= ckpt.run["peak_private_rss_mb"] > 0


@pytest.mark.parametrize("detach", [True, False])
def test_8bit_model_lets_go_of_the_fp32_weights_file(tiny, tmp_path, monkeypatch, detach):
    import shutil
    from pathlib import Path

    folder = shutil.copytree(tiny["llama"], tmp_path / "llama")  # a file no other test has mapped
    if not detach:  # the check itself must see a mapping that is kept
        monkeypatch.setattr(models, "_detach_from_weights_file", lambda model: None)
    loaded = models.load_model(str(folder), load_in_8bit=True)
    assert loaded.info["load_in_8bit"]
    mapped = str(folder / "model.safetensors") in Path("/proc/self/maps").read_text()
    assert mapped is not detach


@pytest.mark.parametrize("eight_bit", [False, True], ids=["fp32-base", "8bit-base"])
def test_bf16_autocast_trains_fp32_lora_weights_to_the_same_loss(tiny, tmp_path, eight_bit):
    fp32 = training.train(_cfg(tiny, "llama", tmp_path / "fp32", max_steps=8, eval_steps=4, save_steps=4, dtype="fp32",
                               load_in_8bit=eight_bit), log=lambda *a: None)
    bf16 = training.train(_cfg(tiny, "llama", tmp_path / "bf16", max_steps=8, eval_steps=4, save_steps=4, dtype="bf16",
                               load_in_8bit=eight_bit), log=lambda *a: None)
    assert (fp32.run["dtype"], bf16.run["dtype"]) == ("fp32", "bf16")
    assert set(bf16.run["dtype_probe"]["matmul_gflops"]) == {"fp32", "bf16"}
    weights = _adapter(bf16.output_dir)
    assert {v.dtype for v in weights.values()} == {torch.float32}  # the trained weights stay fp32
    assert max(v.abs().max().item() for k, v in weights.items() if "lora_B" in k) > 1e-3  # it did train
    # the same run in bf16 arithmetic: validation losses step by step within bf16's rounding
    a = [p["loss"] for p in fp32.run["loss_history"]["validation"]]
    b = [p["loss"] for p in bf16.run["loss_history"]["validation"]]
    assert len(a) == len(b) == 3 and a[-1] < a[0]
    assert max(abs(x - y) for x, y in zip(a, b)) < 0.05, (a, b)


def test_auto_dtype_follows_the_cpu(tiny, tmp_path, monkeypatch):
    from utils import hardware

    monkeypatch.setattr(hardware, "fast_bf16", lambda: False)
    res = training.train(_cfg(tiny, "llama", tmp_path / "auto", max_steps=2, eval_steps=2, save_steps=2),
                         log=lambda *a: None)
    assert res.run["config"]["dtype"] == "auto" and res.run["dtype"] == "fp32"


METHODS = [  # (settings, what is trained, in words)
    ({"peft_method": "lora"}, "LoRA r=8 alpha=16 on q_proj, v_proj"),
    ({"peft_method": "lora", "use_rslora": True, "target_modules": "attention"},
     "LoRA r=8 alpha=16, rsLoRA on q_proj, k_proj, v_proj, o_proj"),
    ({"peft_method": "lora", "target_modules": "all-linear"}, "LoRA r=8 alpha=16 on "),
    ({"peft_method": "dora"}, "DoRA r=8 alpha=16 on q_proj, v_proj"),
    ({"peft_method": "lora", "load_in_4bit": True}, "QLoRA (LoRA on 4-bit NF4 weights) r=8"),
    ({"peft_method": "ia3"}, "IA3 on down_proj, k_proj, v_proj"),
    ({"peft_method": "prefix"}, "prefix tuning (16 virtual tokens)"),
    ({"peft_method": "prompt"}, "prompt tuning (16 virtual tokens)"),
    ({"peft_method": "full"}, "full fine-tuning"),
]


@pytest.mark.parametrize("kw,described", METHODS,
                         ids=["lora", "rslora-attention", "lora-all-linear", "dora", "qlora", "ia3", "prefix", "prompt",
                              "full"])
def test_every_method_trains_counts_its_parameters_and_logs_to_tensorboard(tiny, tmp_path, kw, described):
    from peft import PeftModel

    res = training.train(_cfg(tiny, "llama", tmp_path / "out", max_steps=6, eval_steps=3, save_steps=3, **kw))
    run = res.run
    assert training.method_text(run).startswith(described)
    assert run["peft_method"] == kw["peft_method"] and run["load_in_4bit"] == kw.get("load_in_4bit", False)
    total = sum(p.numel() for p in models.load_model(str(tiny["llama"])).model.parameters())
    trainable = sum(p.numel() for p in res.model.parameters() if p.requires_grad)
    assert run["trainable_params"] == trainable > 0
    if kw["peft_method"] == "full":
        assert run["trainable_params"] == run["total_params"] == total
        assert (res.final_dir / "model.safetensors").exists() and not (res.final_dir / "adapter_config.json").exists()
    else:
        assert run["trainable_params"] < total / 3  # tiny model: all-linear r=8 is 23% of it
        assert isinstance(res.model, PeftModel) and (res.final_dir / "adapter_model.safetensors").exists()
    val = [p["loss"] for p in run["loss_history"]["validation"]]
    assert [p["step"] for p in run["loss_history"]["validation"]] == [0, 3, 6] and val[-1] < val[0]
    assert list((tmp_path / "out" / training.TRACKING_SUBDIR).rglob("events.out.tfevents.*")), "no TensorBoard log"
    if kw.get("load_in_4bit"):  # bitsandbytes' repacking for AVX-512-BF16 CPUs is off (models._keep_4bit_layout)
        four_bit = [m for m in res.model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
        assert four_bit and not any(m.support_avx512bf16_for_cpu for m in four_bit)
