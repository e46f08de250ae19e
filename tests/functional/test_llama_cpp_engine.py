"""The llama.cpp engine on the real SmolLM2 GGUF: same answers as torch on the same weights (base,
and an exported adapter applied at run time), streaming equals one-shot, stop strings hold, and bad
input (another base, no engine installed) is refused by name."""
import sys

import pytest

from tiny import fake_lora_run
from utils import chat, decode, engine, export, models
from utils.generation import prompt_ids

import xllamacpp  # noqa: E402,F401  (a declared dependency: missing or broken is a failure, never a skip)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_torch():
    loaded = models.load_model("smollm2-135m")
    return loaded, chat.chat_format(loaded.spec, loaded.tokenizer)


def _ids(loaded, fmt, n=6):
    return [prompt_ids(loaded.tokenizer, [{"role": "user", "content": p}], fmt) for p in decode.agreement_prompts(n)]


def _check_agreement(result):
    assert result["tokens"] >= 60
    assert result["agreement"] >= 0.9, result
    # every disagreement is a near tie in torch's logits; anything else means different functions
    assert result["near_ties"] == result["disagreements"], result


def test_base_gguf_agrees_with_torch_on_the_same_weights(smollm2, base_torch):
    loaded, fmt = base_torch
    llama = engine.LlamaCppModel(smollm2["gguf"])
    _check_agreement(decode.token_agreement(llama, loaded.model.eval(), _ids(loaded, fmt), new_tokens=16))


def test_exported_adapter_on_llama_cpp_agrees_with_torch_merged(tmp_path, smollm2, base_torch):
    root, _ = fake_lora_run(tmp_path, smollm2, std=0.1)  # changes the replies, still writes text
    result = export.export(root, merged=False)
    merged = models.load_finetuned(root, merge=True)
    loaded, fmt = base_torch
    ids = _ids(loaded, fmt)
    with_lora = engine.LlamaCppModel(smollm2["gguf"], lora=result["lora"])
    same = decode.token_agreement(with_lora, merged.model.eval(), ids, new_tokens=16)
    _check_agreement(same)
    # and the adapter is applied: torch's base model disagrees more, and by clear margins
    plain = decode.token_agreement(with_lora, loaded.model.eval(), ids, new_tokens=16)
    print("with the adapter:", same["agreement"], "without:", plain["agreement"], plain["max_margin"])
    assert plain["agreement"] < same["agreement"]
    assert plain["max_margin"] > 1.0


def test_stream_yields_the_one_shot_text_and_stop_strings_end_it(smollm2, base_torch):
    loaded, fmt = base_torch
    llama = engine.LlamaCppModel(smollm2["gguf"])
    ids = _ids(loaded, fmt, 1)[0]
    whole = llama.complete(ids, 24)
    info = {}
    pieces = list(llama.stream(ids, 24, info=info))
    assert len(pieces) > 1 and "".join(pieces) == whole.text
    assert info["new_tokens"] == len(whole.token_ids)
    word = whole.text.split()[2]
    cut = llama.complete(ids, 24, stop=[word])
    assert word not in cut.text and whole.text.startswith(cut.text)


def test_a_lora_exported_for_another_base_is_refused(tmp_path, smollm2):
    root, _ = fake_lora_run(tmp_path, smollm2)
    lora = export.export(root, merged=False)["lora"]
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF not the base")
    with pytest.raises(engine.EngineError, match=r"lora.gguf was exported against .*re-export it"):
        engine.LlamaCppModel(other, lora=lora)


def test_engine_not_installed_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "xllamacpp", None)
    with pytest.raises(engine.EngineError, match=r"make venv.*xllamacpp=="):
        engine.check_engine("llama.cpp")
    with pytest.raises(engine.EngineError, match="expected one of"):
        engine.check_engine("vllm")


def test_dashboard_serves_a_choice_on_llama_cpp(tmp_path, smollm2):
    from utils import serving

    root, _ = fake_lora_run(tmp_path / "models", smollm2)
    pool = serving.ModelPool(capacity=2, models_dir=tmp_path / "models")
    for choice in (serving.Choice("base", "smollm2-135m", engine="llama.cpp"),
                   serving.Choice("lora", "smollm2-135m", str(root), engine="llama.cpp")):
        text, stats = serving.generate_reply(pool.get(choice), [{"role": "user", "content": "How do I boil an egg?"}],
                                             max_new_tokens=12)
        assert text and stats.new_tokens > 0 and stats.ttft_s is not None and stats.prompt_tokens > 10
    assert (root / "gguf" / "lora.gguf").exists()  # exported on first use
    assert [k[2] for k in pool.loaded_keys()] == ["llama.cpp", "llama.cpp"]
    with pytest.raises(engine.EngineError, match="needs a GGUF model"):
        pool.get(serving.Choice("gpt2", "gpt2", engine="llama.cpp"))


def test_decode_benchmark_writes_the_rows_the_issue_asks_for(tmp_path, smollm2):
    """Small sizes (2 prompts, 6 tokens): the structure and the bookkeeping, not the speed."""
    fake_lora_run(tmp_path / "models", smollm2)
    out = tmp_path / "decode.json"
    report = decode.decode_benchmark(["smollm2-135m", "gpt2"], tmp_path / "models", out, new_tokens=6, repeats=1,
                                     dtype="fp32", n_prompts=2)
    saved = __import__("json").loads(out.read_text())
    assert saved["rows"] == report["rows"] and {"cpu", "memory_bandwidth_gbs"} <= set(saved["machine"])
    assert "gpt2" in saved["skipped"]  # no shipped GGUF: said, not silently dropped
    keys = {"model", "variant", "engine", "dtype", "decode_tokens_per_s", "roofline_fraction", "token_agreement"}
    assert all(keys <= set(r) for r in saved["rows"])
    assert {(r["variant"], r["engine"]) for r in saved["rows"]} == {
        ("base", "torch"), ("base", "llama.cpp"), ("lora", "torch"), ("lora", "llama.cpp")}
    for r in saved["rows"]:
        assert r["decode_tokens_per_s"] > 0 and r["bytes_per_token"] > 0
        assert r["roofline_fraction"] is None or 0 < r["roofline_fraction"] <= 1
        assert (r["token_agreement"] is None) == (r["engine"] == "torch")
    # the target is read off the rows themselves: the best LoRA form on llama.cpp against the base there
    rows = saved["rows"]
    base = next(r["decode_tokens_per_s"] for r in rows if (r["variant"], r["engine"]) == ("base", "llama.cpp"))
    lora = max(r["decode_tokens_per_s"] for r in rows if (r["variant"], r["engine"]) == ("lora", "llama.cpp"))
    torch_lora = next(r["decode_tokens_per_s"] for r in rows if (r["variant"], r["engine"]) == ("lora", "torch"))
    target = saved["targets"]["smollm2-135m"]
    assert target["lora_llama_cpp_vs_base_llama_cpp"] == pytest.approx(lora / base)
    assert target["lora_llama_cpp_vs_lora_torch"] == pytest.approx(lora / torch_lora)
    assert target["target_lora_at_least_base_rate"] == (lora >= base)


@pytest.mark.parametrize("preset", ["smollm2-135m", "gemma3-270m"])
def test_a_gguf_presets_tokenizer_is_read_without_converting_its_weights(preset, tmp_path, monkeypatch):
    # the llama.cpp engine needs our tokenizer only: on a brand-new machine asking for it must not
    # dequantise the whole model into the safetensors cache first
    spec = models.resolve(preset)
    converted = models._load_tokenizer(spec, models.weights_folder(spec)[0])  # the per-machine cache
    monkeypatch.setenv("LORA_COMPARE_CACHE", str(tmp_path))
    alone = models.load_tokenizer(preset)
    assert not list(tmp_path.rglob("*.safetensors")), "the weights were converted"
    assert models.load_tokenizer(preset).get_vocab() == alone.get_vocab()  # kept, read back the same
    fmt = chat.chat_format(spec, converted)
    texts = ["Hello there!", "I've been feeling anxious lately. Any tips?", "naïve café 東京 🙂\n\n  x"]
    for text in texts:
        messages = [{"role": "user", "content": text}]
        assert prompt_ids(alone, messages, fmt) == prompt_ids(converted, messages, fmt), text
    assert alone.get_vocab() == converted.get_vocab()
    assert (alone.eos_token_id, alone.pad_token_id) == (converted.eos_token_id, converted.pad_token_id)
