"""Evaluation and report on tiny random models (real MiniLM embeddings for the scores)."""
import json

import pytest
import torch

from tiny import save_tiny_model, write_splits
from utils import chat, evaluation, generation, models, report, training
from utils.training import TrainConfig


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = write_splits(root / "data")
    llama = save_tiny_model(root / "llama", "llama")
    gpt2 = save_tiny_model(root / "gpt2", "gpt2")
    for name, path in (("llama", llama), ("gpt2", gpt2)):
        training.train(TrainConfig(model=str(path), data_dir=str(data), output_dir=str(root / "models" / f"{name}-lora"),
                                   load_in_8bit=False, max_steps=2, eval_steps=2, save_steps=2, batch_size=4),
                       log=lambda *a: None)
    return {"root": root, "data": data, "llama": llama, "gpt2": gpt2}


def test_heldout_loss_matches_the_models_own_loss(setup):
    loaded = models.load_model(str(setup["llama"]))
    rows = [json.loads(line) for line in (setup["data"] / "validation.jsonl").read_text().splitlines()][:1]
    got = evaluation.heldout_loss(loaded.model, loaded.tokenizer, "plain", rows)
    enc = chat.encode(rows[0]["messages"], loaded.tokenizer, "plain", 256)
    with torch.no_grad():
        ref = loaded.model(input_ids=torch.tensor([enc.input_ids]), labels=torch.tensor([enc.labels])).loss
    assert got["loss"] == pytest.approx(float(ref), rel=1e-5)
    assert got["perplexity"] == pytest.approx(float(torch.exp(ref)), rel=1e-5)


def test_batched_generation_equals_one_by_one(setup):
    loaded = models.load_model(str(setup["llama"]))
    convs = [[{"role": "user", "content": t}] for t in ("hi", "say cat 3 please", "a much longer prompt than the others")]
    batched = generation.generate_batch(loaded.model, loaded.tokenizer, convs, "plain", max_new_tokens=6, batch_size=3,
                                        progress=False)
    single = [generation.generate_batch(loaded.model, loaded.tokenizer, [c], "plain", max_new_tokens=6, batch_size=1,
                                        progress=False)[0] for c in convs]
    assert [g.text for g in batched] == [g.text for g in single]
    assert all(g.batch_size == 3 for g in batched)


def test_evaluate_base_and_lora_side_by_side_and_build_report(setup, tmp_path):
    cfg = evaluation.EvalConfig(models=[str(setup["llama"]), str(setup["gpt2"])], data_dir=str(setup["data"]),
                                num_examples=5, max_new_tokens=5, batch_size=4, judge_model=str(setup["llama"]),
                                loss_examples=4, report_dir=str(tmp_path), models_dir=str(setup["root"] / "models"))
    res = evaluation.evaluate(cfg, log=lambda *a: None)
    assert list(res["summary"]) == ["llama (base)", "llama (LoRA)", "gpt2 (base)", "gpt2 (LoRA)"]
    for stats in res["summary"].values():
        assert stats["coherence"]["n"] == 5 and 1 <= stats["coherence"]["mean"] <= 5
        assert stats["relevance"]["low"] <= stats["relevance"]["mean"] <= stats["relevance"]["high"]
    assert set(res["win_rates"]) == {"llama (LoRA) vs llama (base)", "gpt2 (LoRA) vs gpt2 (base)",
                                     "llama (LoRA) vs gpt2 (LoRA)"}
    assert res["variants"]["llama (LoRA)"]["trainable"]["trainable_params"] > 0
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 5

    # the report reads what the notebooks wrote
    (tmp_path / "runs").mkdir()
    for name in ("llama", "gpt2"):
        run = setup["root"] / "models" / f"{name}-lora" / "run.json"
        (tmp_path / "runs" / f"{name}.json").write_text(run.read_text())
    html_path = report.build_report(tmp_path)
    m = json.loads((tmp_path / "metrics.json").read_text())
    for name in res["summary"]:
        row = m["response"][name]
        for field in ("avg_len_words", "coherence", "relevance"):
            assert {"mean", "low", "high", "n"} <= set(row[field])
    assert set(m["trainable_params"]) == {"llama", "gpt2"}
    text = html_path.read_text()
    assert "Response characteristics" in text and "Trainable parameters" in text and "data:image/png;base64" in text


def test_missing_data_names_the_notebook(tmp_path):
    with pytest.raises(evaluation.EvaluationError, match="test.jsonl not found: run notebooks/01_data_prep.ipynb first"):
        evaluation.evaluate(evaluation.EvalConfig(data_dir=str(tmp_path)))


def test_plain_format_stops_at_the_next_user_turn(setup, monkeypatch):
    """A base model in the plain format that goes on to write "User: ..." is cut there,
    in batched generation and in streaming alike."""
    loaded = models.load_model(str(setup["llama"]))
    tok = loaded.tokenizer
    scripted = tok("Fine thanks\nUser: and you?\nAssistant: ok", add_special_tokens=False)["input_ids"]

    def fake_generate(input_ids=None, streamer=None, **kw):
        assert kw.get("stop_strings") == [generation.PLAIN_STOP]
        out = torch.cat([input_ids, torch.tensor([scripted] * input_ids.shape[0])], dim=1)
        if streamer is not None:
            streamer.put(input_ids)
            for t in scripted:
                streamer.put(torch.tensor([t]))
            streamer.end()
        return out

    monkeypatch.setattr(loaded.model, "generate", fake_generate)
    convs = [[{"role": "user", "content": "how are you?"}]]
    assert generation.generate_batch(loaded.model, tok, convs, "plain", progress=False)[0].text == "Fine thanks"
    assert "".join(generation.stream(loaded.model, tok, convs[0], "plain")) == "Fine thanks"
    # a reply without the stop string streams whole, and the stream ends
    scripted[:] = tok("All good, no more turns", add_special_tokens=False)["input_ids"]
    assert "".join(generation.stream(loaded.model, tok, convs[0], "plain")) == "All good, no more turns"
