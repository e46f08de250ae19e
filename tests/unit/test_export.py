"""Export for llama.cpp: tensor names and row order checked against the real SmolLM2 GGUF, the LoRA
GGUF's keys, the merged GGUF's weights, and refusals that name the file and the fix."""
import json
import math

import numpy as np
import pytest

from tiny import fake_lora_run as _fake_run
from utils import export as E

import gguf  # a declared dependency: missing or broken is a failure, never a skip  # noqa: E402


def test_rope_permute_interleaves_the_two_halves_of_each_head():
    rows = np.arange(8, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)  # 2 heads of 4 rows
    out = E.rope_permute(rows, n_head=2)
    assert out[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert (out[:, 1:] == out[:, :1]).all()  # whole rows move, columns untouched


def test_rope_permute_refuses_rows_that_do_not_split_into_heads():
    with pytest.raises(E.ExportError, match="heads"):
        E.rope_permute(np.zeros((6, 2), np.float32), n_head=4)


def test_adapter_scale_plain_and_rslora():
    assert E.adapter_scale({"r": 8, "lora_alpha": 16}) == 2.0
    assert E.adapter_scale({"r": 16, "lora_alpha": 16, "use_rslora": True}) == 4.0


# --------------------------------------------------------------------------- on the real SmolLM2 GGUF

def _tensor(path, name):
    reader = gguf.GGUFReader(str(path))
    t = next(t for t in reader.tensors if t.name == name)
    return gguf.quants.dequantize(t.data, t.tensor_type), t


@pytest.mark.slow
def test_name_map_and_row_order_match_the_shipped_gguf(smollm2):
    """The mapping this exporter applies to LoRA's B matrices is the one the GGUF's own conversion
    applied to the weights: HF q/k rows reordered per head (q with 9 heads, k with 3), v as is."""
    base = E.Base(smollm2["gguf"])
    assert (base.arch, base.n_head, base.n_head_kv) == ("llama", 9, 3)
    hf = smollm2["hf"]
    for module, heads in (("q_proj", 9), ("k_proj", 3), ("v_proj", None)):
        ours = hf[f"model.layers.5.self_attn.{module}.weight"]
        expected = E.rope_permute(ours, heads) if heads else ours
        pairs = E.lora_pairs({f"base_model.model.model.layers.5.self_attn.{module}.lora_A.weight": np.zeros((2, 576)),
                              f"base_model.model.model.layers.5.self_attn.{module}.lora_B.weight": ours[:, :2]},
                             base.arch, base.n_blocks, base.n_head, base.n_head_kv)
        shipped, _ = _tensor(smollm2["gguf"], pairs[0].gguf_name + ".weight")
        np.testing.assert_array_equal(shipped, expected)
        # lora_B's rows were moved exactly like the weight's rows
        np.testing.assert_array_equal(pairs[0].b, expected[:, :2])


@pytest.mark.slow
def test_export_writes_an_adapter_gguf_and_a_merged_gguf(tmp_path, smollm2):
    root, tensors = _fake_run(tmp_path, smollm2, rank=4, alpha=8)
    result = E.export(root)
    assert result["tensors"] == 4 and result["base_sha256"] == smollm2["sha256"]

    lora = gguf.GGUFReader(result["lora"])
    fields = {f.name: f.contents() for f in lora.fields.values() if not f.name.startswith("GGUF.")}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 8.0 and fields["general.architecture"] == "llama"
    assert fields[E.BASE_SHA_KEY] == smollm2["sha256"]
    shapes = {t.name: [int(x) for x in t.shape] for t in lora.tensors}  # ggml order: [columns, rows]
    assert shapes["blk.7.attn_q.weight.lora_a"] == [576, 4]
    assert shapes["blk.7.attn_q.weight.lora_b"] == [4, 576]
    assert shapes["blk.0.attn_v.weight.lora_b"] == [4, 192]
    assert len(shapes) == 8

    # merged: touched tensors = base + (alpha/r) B A in the GGUF's row order, within Q8_0 rounding
    key = "base_model.model.model.layers.7.self_attn.q_proj"
    hf_merged = smollm2["hf"]["model.layers.7.self_attn.q_proj.weight"] + 2.0 * (
        tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"])
    merged, t = _tensor(result["merged"], "blk.7.attn_q.weight")
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
    err = np.abs(merged - E.rope_permute(hf_merged, 9))
    assert err.max() < np.abs(hf_merged).max() / 100  # Q8_0: ~1/254 of each block's largest value
    # untouched tensors and metadata are copied as they were
    base = gguf.GGUFReader(str(smollm2["gguf"]))
    out = gguf.GGUFReader(result["merged"])
    before = {t.name: t for t in base.tensors}
    for t in out.tensors:
        if t.name not in ("blk.0.attn_q.weight", "blk.0.attn_v.weight", "blk.7.attn_q.weight", "blk.7.attn_v.weight"):
            assert t.tensor_type == before[t.name].tensor_type
            assert np.array_equal(np.asarray(t.data), np.asarray(before[t.name].data)), t.name
    assert len(out.tensors) == len(base.tensors)
    assert out.get_field("tokenizer.chat_template").contents() == base.get_field("tokenizer.chat_template").contents()
    assert out.get_field(E.ADAPTER_KEY) is not None


@pytest.mark.slow
def test_rslora_alpha_is_written_so_that_llama_cpp_scales_by_alpha_over_sqrt_r(tmp_path, smollm2):
    root, _ = _fake_run(tmp_path, smollm2, rank=4, alpha=8, extra={"use_rslora": True})
    result = E.export(root, merged=False)
    alpha = gguf.GGUFReader(result["lora"]).get_field("adapter.lora.alpha").contents()
    assert alpha / 4 == pytest.approx(8 / math.sqrt(4))  # llama.cpp: scale = alpha / r


@pytest.mark.slow
def test_export_refuses_a_base_that_is_not_the_one_trained_on(tmp_path, smollm2):
    root, _ = _fake_run(tmp_path, smollm2, sha="0" * 64)
    with pytest.raises(E.ExportError, match=r"sha256 .*trained on 0000000000000000.*export against"):
        E.export(root)
    assert not (root / "gguf" / "lora.gguf").exists()


@pytest.mark.slow
def test_export_refuses_an_adapter_of_another_shape(tmp_path, smollm2):
    root, tensors = _fake_run(tmp_path, smollm2)
    from safetensors.numpy import save_file

    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = np.zeros((4, 1024), np.float32)  # a wider model's input size
    save_file(tensors, str(root / "final" / "adapter_model.safetensors"))
    with pytest.raises(E.ExportError, match=r"q_proj is 576x1024 but blk.0.attn_q.weight .* another model"):
        E.export(root)


@pytest.mark.parametrize("extra, message", [({"use_dora": True}, "DoRA"), ({"peft_type": "IA3"}, "only LoRA"),
                                            ({"modules_to_save": ["lm_head"]}, "modules_to_save")])
def test_adapters_llama_cpp_cannot_take_are_refused(tmp_path, extra, message):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, **extra}))
    with pytest.raises(E.ExportError, match=message):
        E.read_adapter(tmp_path)


def test_corrupt_adapter_files_are_named(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"r": 4,\n oops}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(E.ExportError, match=r"adapter_config.json:2: not valid JSON"):
        E.read_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8}')
    with pytest.raises(E.ExportError, match=r"adapter_model.safetensors: cannot be read as safetensors"):
        E.read_adapter(tmp_path)


def test_a_missing_adapter_file_is_named(tmp_path):
    with pytest.raises(E.ExportError, match=r"adapter_config.json not found"):
        E.read_adapter(tmp_path)


def test_unknown_tensors_and_half_pairs_are_refused():
    a = np.zeros((2, 8), np.float32)
    with pytest.raises(E.ExportError, match="not a lora_A/lora_B"):
        E.lora_pairs({"model.layers.0.self_attn.q_proj.weight": a}, "llama", 1, 2, 2)
    with pytest.raises(E.ExportError, match=r"only \['lora_A'\]"):
        E.lora_pairs({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": a}, "llama", 1, 2, 2)
