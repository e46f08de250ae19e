"""Evaluation and report on tiny random models (real MiniLM embeddings for the scores)."""
import json

import pytest
import torch

from tiny import save_tiny_model, write_splits
from utils import chat, evaluation, generation, models, report, training
from utils.training import TrainConfig


SUITE_SAMPLE = [
    {
        "id": "d1",
        "category": "emotional_support",
        "prompt": "say cat",
        "history": [{"role": "user", "content": "say cat"}],
        "reference": None,
        "note": "be warm",
    },
    {
        "id": "d2",
        "category": "emotional_support",
        "prompt": "say dog",
        "history": [{"role": "user", "content": "say dog"}],
        "reference": None,
        "note": "be warm",
    },
    {
        "id": "d3",
        "category": "factual",
        "prompt": "say sun",
        "history": [{"role": "user", "content": "say sun"}],
        "reference": "sun",
        "note": "be right",
    },
    {
        "id": "d4",
        "category": "factual",
        "prompt": "say moon",
        "history": [{"role": "user", "content": "say moon"}],
        "reference": "moon",
        "note": "be right",
    },
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = write_splits(root / "data")
    llama = save_tiny_model(root / "llama", "llama")
    gpt2 = save_tiny_model(root / "gpt2", "gpt2")
    for name, path in (("llama", llama), ("gpt2", gpt2)):
        training.train(
            TrainConfig(
                model=str(path),
                data_dir=str(data),
                output_dir=str(root / "models" / f"{name}-lora"),
                load_in_8bit=False,
                max_steps=2,
                eval_steps=2,
                save_steps=2,
                batch_size=4,
            ),
            log=lambda *a: None,
        )
    judge = save_tiny_model(root / "judge", "llama", seed=1)
    return {"root": root, "data": data, "llama": llama, "gpt2": gpt2, "judge": judge}


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
    convs = [
        [{"role": "user", "content": t}] for t in ("hi", "say cat 3 please", "a much longer prompt than the others")
    ]
    batched = generation.generate_batch(loaded.model, loaded.tokenizer, convs, "plain", max_new_tokens=6, batch_size=3,
                                        progress=False)
    single = [generation.generate_batch(loaded.model, loaded.tokenizer, [c], "plain", max_new_tokens=6, batch_size=1,
                                        progress=False)[0] for c in convs]
    assert [g.text for g in batched] == [g.text for g in single]
    assert all(g.batch_size == 3 for g in batched)


def test_evaluate_base_and_lora_side_by_side_and_build_report(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluation, "load_domain_suite", lambda: SUITE_SAMPLE)  # tiny models: a small suite
    cfg = evaluation.EvalConfig(models=[str(setup["llama"]), str(setup["gpt2"])], data_dir=str(setup["data"]),
                                suite="both", judge_suite="both", num_examples=5, max_new_tokens=5, batch_size=4,
                                judge_model=str(setup["judge"]), judge_dtype="fp32", validity=False,
                                loss_examples=4, report_dir=str(tmp_path), models_dir=str(setup["root"] / "models"))
    res = evaluation.evaluate(cfg, log=lambda *a: None)
    assert list(res["summary"]) == ["llama (base)", "llama (LoRA)", "gpt2 (base)", "gpt2 (LoRA)"]
    n = 5 + len(SUITE_SAMPLE)
    for stats in res["summary"].values():
        for grade in ("overall", "relevance", "coherence"):
            assert stats[grade]["n"] == n and 1 <= stats[grade]["mean"] <= 5
            assert stats[grade]["low"] <= stats[grade]["mean"] <= stats[grade]["high"]
    assert res["categories"] == {"emotional_support": 2, "factual": 2, "test split": 5}
    pairs = {"llama (LoRA) vs llama (base)", "gpt2 (LoRA) vs gpt2 (base)", "llama (LoRA) vs gpt2 (LoRA)"}
    assert set(res["pairwise"]) == pairs and set(res["grade_differences"]) == pairs
    for w in res["pairwise"].values():
        assert w["n"] == n and w["wins"] + w["ties"] + w["losses"] == n
        assert sum(c["n"] for c in w["by_category"].values()) == n
    assert len(res["verdicts"]) == 3 and all(v.split(":")[0] in pairs for v in res["verdicts"])
    assert res["judge"]["dtype"] == "fp32" and res["judge"]["timing"]["pair"]["calls"] == 3 * n * 2
    assert res["variants"]["llama (LoRA)"]["trainable"]["trainable_params"] > 0
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == n

    # the notebook's tables show every variant and comparison, intervals around their means
    quality = evaluation.quality_table(res)
    assert list(quality.index) == list(res["summary"]) and list(quality["n"]) == [n] * 4
    s = res["summary"]["llama (LoRA)"]["overall"]
    assert quality.loc["llama (LoRA)", "Overall /5"] == f"{s['mean']:.2f} [{s['low']:.2f}, {s['high']:.2f}]"
    assert set(evaluation.pairwise_table(res)["comparison"]) == pairs
    assert set(evaluation.differences_table(res).index) == pairs
    assert evaluation.signals_table(res).loc["llama (LoRA)", "held-out loss"] != "–"

    # the report reads what the notebooks wrote
    (tmp_path / "runs").mkdir()
    for name in ("llama", "gpt2"):
        run = setup["root"] / "models" / f"{name}-lora" / "run.json"
        (tmp_path / "runs" / f"{name}.json").write_text(run.read_text())
    html_path = report.build_report(tmp_path)
    m = json.loads((tmp_path / "metrics.json").read_text())
    for name in res["summary"]:
        row = m["response"][name]
        for field in ("avg_len_words", "overall", "coherence", "relevance"):
            assert {"mean", "low", "high", "n"} <= set(row[field])
    assert set(m["trainable_params"]) == {"llama", "gpt2"}
    assert m["verdicts"] == res["verdicts"] and m["headline"] == res["headline"] and len(res["headline"]) == 3
    assert res["headline"][0].startswith("On the domain suite and the test split, ")
    assert {"steps", "total_seconds", "cpu", "judge_seconds_per_reply", "judge_seconds_per_pair_order",
            "judge_cache"} <= set(m["timings"]) and m["timings"]["judge_seconds_per_reply"] > 0
    text = html_path.read_text()
    assert text.index(res["headline"][0].split(":")[0]) < text.index("<h2>Verdicts</h2>")
    assert text.index("<h2>Verdicts</h2>") < text.index("Response quality") < text.index("Trainable parameters")
    assert "data:image/png;base64" in text


def test_by_default_the_judge_grades_the_domain_suite_and_the_test_split_gets_reference_metrics(setup, tmp_path,
                                                                                              monkeypatch):
    monkeypatch.setattr(evaluation, "load_domain_suite", lambda: SUITE_SAMPLE)
    cfg = evaluation.EvalConfig(models=[str(setup["llama"])], data_dir=str(setup["data"]), suite="both",
                                num_examples=3, max_new_tokens=4, judge_model=str(setup["judge"]), judge_dtype="fp32",
                                loss_examples=2, models_dir=str(setup["root"] / "models"))
    assert cfg.judge_suite == "auto" and cfg.validity == "cached"
    res = evaluation.evaluate(cfg, log=lambda *a: None)
    rows = res["per_example"]["llama (LoRA)"]
    domain = [r for r in rows if r["category"] != evaluation.TEST_CATEGORY]
    test = [r for r in rows if r["category"] == evaluation.TEST_CATEGORY]
    assert len(domain) == len(SUITE_SAMPLE) and len(test) == 3
    assert all("overall" in r for r in domain) and not any("overall" in r for r in test)
    assert all("rouge_l" in r for r in test)  # the test split's references still score the replies
    w = res["pairwise"]["llama (LoRA) vs llama (base)"]
    assert w["n"] == len(SUITE_SAMPLE) and res["summary"]["llama (LoRA)"]["overall"]["n"] == len(SUITE_SAMPLE)
    assert res["headline"][0].startswith("Fine-tuning ") and "on the domain suite" in res["headline"][0]
    # a tiny judge has no validity study on this machine: not scored behind the user's back, and said so
    assert res.get("validity_notes") is None


@pytest.mark.parametrize("suite, judge_suite, error", [
    ("test", "domain", "the judge would grade no prompt"), ("both", "all", "expected one of"),
])
def test_a_judge_suite_that_grades_nothing_or_is_unknown_is_refused(setup, suite, judge_suite, error):
    cfg = evaluation.EvalConfig(models=[str(setup["llama"])], data_dir=str(setup["data"]), suite=suite,
                                judge_suite=judge_suite, judge_model=str(setup["judge"]))
    with pytest.raises(evaluation.EvaluationError, match=error):
        evaluation.evaluate(cfg, log=lambda *a: None)
    with pytest.raises(evaluation.EvaluationError, match="validity='sometimes'; expected one of"):
        evaluation.evaluate(evaluation.EvalConfig(models=[str(setup["llama"])], data_dir=str(setup["data"]),
                                                  validity="sometimes"), log=lambda *a: None)


def test_the_judge_is_not_silently_a_compared_model(setup, tmp_path):
    cfg = evaluation.EvalConfig(
        models=[str(setup["llama"])], judge_model=str(setup["llama"]), data_dir=str(setup["data"])
    )
    with pytest.raises(evaluation.EvaluationError, match="is also a compared model"):
        evaluation.evaluate(cfg)
    cfg = evaluation.EvalConfig(
        models=[str(setup["llama"])],
        judge_model=str(setup["llama"]),
        allow_judge_as_model=True,
        data_dir=str(setup["data"]),
        suite="test",
        num_examples=2,
        max_new_tokens=3,
        validity=False,
        pairwise=False,
        loss_examples=2,
        report_dir=str(tmp_path),
        models_dir=str(tmp_path / "no-models"),
        judge_dtype="fp32",
    )
    res = evaluation.evaluate(cfg, log=lambda *a: None)
    assert res["judge_is_compared"] == [str(setup["llama"])]
    assert "Warning: the judge" in report.render_html(report.collect_metrics(tmp_path), tmp_path)


def test_generation_dtype_is_chosen_recorded_and_reported(setup, tmp_path):
    cfg = evaluation.EvalConfig(
        models=[str(setup["llama"])],
        judge_model=None,
        data_dir=str(setup["data"]),
        suite="test",
        num_examples=2,
        max_new_tokens=3,
        validity=False,
        pairwise=False,
        loss_examples=2,
        report_dir=str(tmp_path),
        models_dir=str(tmp_path / "no-models"),
        dtype="bf16",
    )
    res = evaluation.evaluate(cfg, log=lambda *a: None)
    assert res["dtype"] == "bf16" and res["variants"]["llama (base)"]["dtype"] == "bf16"
    assert set(res["dtype_probe"]["matmul_gflops"]) == {"fp32", "bf16"}
    assert res["variants"]["llama (base)"]["heldout"]["loss"] > 0
    assert "Replies generated in <b>bf16</b>" in report.render_html(report.collect_metrics(tmp_path), tmp_path)
    with pytest.raises(evaluation.EvaluationError, match=r"dtype='int8' for generation; expected one of"):
        evaluation.evaluate(evaluation.EvalConfig(models=[str(setup["llama"])], dtype="int8"))


def test_domain_suite_covers_the_categories():
    items = evaluation.load_domain_suite()
    cats = evaluation.categories(items)
    assert len(items) >= 60
    assert {"everyday_advice", "emotional_support", "factual", "crisis_adjacent"} <= set(cats)
    assert all(it["note"] for it in items)  # every category has its rubric line
    assert len({it["prompt"] for it in items}) == len(items)
    assert any("anxious" in it["prompt"] for it in items if it["category"] == "emotional_support")


def test_suite_parameter_is_checked(tmp_path):
    with pytest.raises(evaluation.EvaluationError, match="suite='all'; expected one of"):
        evaluation.eval_items(evaluation.EvalConfig(suite="all"))
    bad = tmp_path / "suite.yaml"
    bad.write_text("categories: {a: {rubric: x}}\nprompts:\n- {category: b, prompt: hi}\n")
    with pytest.raises(evaluation.EvaluationError, match=r"prompts\[0\] has category 'b'; expected one of \['a'\]"):
        evaluation.load_domain_suite(bad)


def test_verdict_sentences_say_where_the_data_cannot_tell():
    ci = lambda m, lo, hi: {"mean": m, "low": lo, "high": hi, "n": 100}  # noqa: E731
    pairwise = {"A vs B": {"n": 100, "win_rate": 0.7, "low": 0.62, "high": 0.78}}
    diffs = {
        "A vs B": {
            "overall": ci(0.5, 0.3, 0.7),
            "relevance": ci(-0.4, -0.6, -0.2),
            "coherence": ci(0.05, -0.1, 0.2),
            "words": ci(3.0, 1.0, 5.0),
        }
    }
    text = evaluation.verdict_sentences([("A", "B")], pairwise, diffs)[0]
    assert text.startswith("A vs B: the judge prefers A (A wins 0.70 [0.62, 0.78] of 100")
    assert "A grades higher on overall +0.50" in text and "A grades lower on relevance -0.40" in text
    assert "cannot tell them apart on coherence" in text
    assert "reply length, A minus B: +3.0 [+1.0, +5.0] words (n=100)" in text  # signed, never "-3 words longer"
    pairwise["A vs B"].update(win_rate=0.52, low=0.44, high=0.60)
    assert "pairwise verdicts cannot tell them apart" in evaluation.verdict_sentences([("A", "B")], pairwise, diffs)[0]


def test_missing_data_names_the_notebook(tmp_path):
    with pytest.raises(evaluation.EvaluationError,
                       match=r"run notebooks/01_data_prep.ipynb first \(no .*test.jsonl\)"):
        evaluation.evaluate(evaluation.EvalConfig(data_dir=str(tmp_path)))
    with pytest.raises(evaluation.EvaluationError,
                       match=r"run notebooks/01_data_prep.ipynb first \(no .*test.jsonl\)"):
        evaluation.check_inputs(evaluation.EvalConfig(data_dir=str(tmp_path)))


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


def test_a_reply_stopped_by_the_length_cap_is_marked_truncated(setup, monkeypatch):
    loaded = models.load_model(str(setup["llama"]))
    tok = loaded.tokenizer
    words = tok("ok then go", add_special_tokens=False)["input_ids"][:3]
    stop = generation.stop_token_ids(tok, loaded.model)[0]
    rows = {"finished": words[:2] + [stop, tok.pad_token_id], "cut": (words * 2)[:4]}

    def fake_generate(input_ids=None, **kw):
        assert kw["max_new_tokens"] == 4
        return torch.cat([input_ids, torch.tensor([rows["finished"], rows["cut"]])], dim=1)

    monkeypatch.setattr(loaded.model, "generate", fake_generate)
    convs = [[{"role": "user", "content": "same length a"}], [{"role": "user", "content": "same length b"}]]
    out = generation.generate_batch(loaded.model, tok, convs, "plain", max_new_tokens=4, batch_size=2, progress=False)
    assert [(g.new_tokens, g.truncated) for g in out] == [(2, False), (4, True)]


def test_the_ladder_is_graded_the_way_each_part_of_the_suite_is():
    from html import escape

    from utils import report, validity as V

    assert evaluation.validity_needed("both") == {"validity": False, "validity_notes": True}
    assert evaluation.validity_needed("test") == {"validity": False}
    assert evaluation.validity_needed("domain") == {"validity_notes": True}

    def fake_ladder(rank_echo_high):
        def score(rows):
            return [{g: (5.0 if r["tier"] == "echo" and rank_echo_high else 4.0 if r["tier"] == "good" else 2.0)
                     for g in ("relevance", "coherence", "overall")} for r in rows]
        return V.run(score)

    plain, noted = fake_ladder(False), fake_ladder(True)
    result = {"verdicts": [], "summary": {}, "categories": {}, "validity": plain, "validity_notes": noted}
    text = evaluation.summary(result)
    for key, how in evaluation.VALIDITY_VIEWS.items():
        assert how in text
        rel = 100 * result[key]["shares"]["relevance"]["share"]
        assert f"({how}): relevance {rel:.0f}%" in text
    assert plain["shares"]["relevance"]["share"] > noted["shares"]["relevance"]["share"]
    html = "".join(report._validity_html({"validity": plain, "validity_notes": noted}))
    assert html.count("<h2>Score validity") == 2
    assert escape(evaluation.VALIDITY_VIEWS["validity_notes"]) in html
    only_suite = "".join(report._validity_html({"validity": None, "validity_notes": noted}))
    assert only_suite.count("<h2>Score validity") == 1


def test_pairwise_summary_has_a_length_controlled_rate_and_says_when_it_disagrees():
    """A wins exactly where its reply is longer (80% of prompts): the raw rate favours A, the
    length-controlled one cannot tell them apart, and the verdict sentence says length drives it."""
    import numpy as np

    from utils.evaluation import length_disagreement, pairwise_summary, verdict_sentences

    rng = np.random.default_rng(3)
    la = rng.integers(10, 90, 64)
    lb = np.where(rng.random(64) < 0.8, la - rng.integers(1, 40, 64), la + rng.integers(1, 40, 64))
    verdicts = [{"verdict": "A" if x > y else "B", "p_a": 1.0 if x > y else 0.0} for x, y in zip(la, lb)]
    w = pairwise_summary(verdicts, seed=0, lengths=(la.tolist(), lb.tolist()))
    assert w["low"] > 0.5 and w["length_controlled"]["low"] <= 0.5 <= w["length_controlled"]["high"]
    assert "length drives the raw verdict" in length_disagreement(w)
    sentences = verdict_sentences([("x", "y")], {"x vs y": w}, {"x vs y": {}})
    assert "length drives the raw verdict" in sentences[0]
    fair = pairwise_summary([{"verdict": "A", "p_a": 1.0}] * 50 + [{"verdict": "B", "p_a": 0.0}] * 14, seed=0,
                            lengths=(rng.integers(10, 90, 64).tolist(), rng.integers(10, 90, 64).tolist()))
    assert fair["length_controlled"]["low"] > 0.5 and length_disagreement(fair) is None
    assert "length_controlled" not in pairwise_summary(verdicts, seed=0)
