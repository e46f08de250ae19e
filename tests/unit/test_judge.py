"""The judge's machinery on a tiny random Llama (byte tokenizer, plain format): the shared-prefix
cache gives the same probabilities as one full forward pass, grades are expectations over 1..5,
and pairwise verdicts cancel position."""
import pytest
import torch

from tiny import save_tiny_model
from utils import hardware, judge as J


@pytest.fixture(scope="module")
def tiny_judge(tmp_path_factory):
    path = save_tiny_model(tmp_path_factory.mktemp("judge") / "llama", "llama")
    return J.LLMJudge(str(path), dtype="fp32")


def full_pass_probs(judge, prefix, body, question, option_ids):
    """Reference: the same text in one forward pass, no cache."""
    ids = prefix["ids"] + judge._encode(body) + judge._encode(question + prefix["tail"])
    with torch.inference_mode():
        logits = judge.model(input_ids=torch.tensor([ids])).logits[0, -1]
    return torch.softmax(logits[list(option_ids)].float(), -1)


def test_cached_prefix_and_batched_questions_equal_one_full_pass(tiny_judge):
    body = J.reply_block("how are you?", "fine thanks, and you?", reference="good", note="be kind")
    questions = [J.QUESTION[c] for c in J.CRITERIA]
    probs, _ = tiny_judge._score_options(tiny_judge._grade_prefix, body, questions, tiny_judge.grade_ids, "grade")
    for row, q in zip(probs, questions):
        ref = full_pass_probs(tiny_judge, tiny_judge._grade_prefix, body, q, tiny_judge.grade_ids)
        torch.testing.assert_close(row, ref, atol=1e-5, rtol=1e-4)
    # the cached prefix is not changed by use: a second call gives the same answer
    again, _ = tiny_judge._score_options(tiny_judge._grade_prefix, body, questions, tiny_judge.grade_ids, "grade")
    torch.testing.assert_close(probs, again)


def test_grade_is_the_expectation_over_the_five_grades(tiny_judge):
    g = tiny_judge.grade("say cat", "cat cat cat")
    for c in J.CRITERIA:
        probs = g[f"{c}_probs"]
        assert sum(probs) == pytest.approx(1, abs=1e-3)
        assert g[c] == pytest.approx(sum((i + 1) * p for i, p in enumerate(probs)), abs=1e-3)
        assert 1 <= g[c] <= 5
    assert g["judge_seconds"] > 0
    assert tiny_judge.timing_summary()["grade"]["passes"] >= 1


def test_empty_reply_gets_one_without_asking(tiny_judge):
    before = tiny_judge.timing["grade"].passes
    g = tiny_judge.grade("say cat", "   ")
    assert all(g[c] == 1.0 for c in J.CRITERIA)
    assert tiny_judge.timing["grade"].passes == before


def test_unknown_criterion_is_refused(tiny_judge):
    with pytest.raises(J.JudgeError, match="unknown criteria"):
        tiny_judge.grade("q", "r", criteria=["helpfulness"])


def test_pairwise_cancels_position(tiny_judge):
    ab = tiny_judge.compare("say dog", "dog dog", "cat")
    ba = tiny_judge.compare("say dog", "cat", "dog dog")
    assert ab["p_a"] == pytest.approx(1 - ba["p_a"], abs=1e-6)
    assert {ab["verdict"], ba["verdict"]} in ({"A", "B"}, {"tie"})


def test_verdict_needs_both_orders_to_agree(tiny_judge, monkeypatch):
    answers = iter([0.8, 0.3])  # A wins shown first; B wins when B is shown first
    monkeypatch.setattr(tiny_judge, "prefer", lambda *a, **k: next(answers))
    assert tiny_judge.compare("q", "a", "b")["verdict"] == "A"
    answers = iter([0.8, 0.6])  # whichever is shown first wins: position bias, no verdict
    monkeypatch.setattr(tiny_judge, "prefer", lambda *a, **k: next(answers))
    out = tiny_judge.compare("q", "a", "b")
    assert out["verdict"] == "tie" and out["p_a"] == pytest.approx(0.6)


def test_int8_judge_stays_close_to_fp32(tmp_path):
    path = save_tiny_model(tmp_path / "llama", "llama")
    fp32 = J.LLMJudge(str(path), dtype="fp32").grade("say cat", "cat cat")
    int8 = J.LLMJudge(str(path), dtype="int8")
    assert int8.dtype == "int8" and int8.info["dtype"] == "int8"
    got = int8.grade("say cat", "cat cat")
    for c in J.CRITERIA:
        assert got[c] == pytest.approx(fp32[c], abs=0.25)


def test_dtype_choice_follows_the_cpu(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert hardware.pick_dtype("auto", "inference") == "int8"
    assert hardware.pick_dtype("auto", "training") == "fp32"
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16", "avx512_bf16"}))
    assert hardware.pick_dtype("auto", "inference") == "bf16"
    assert hardware.pick_dtype("fp32") == "fp32"
    with pytest.raises(ValueError, match="dtype='fp16'; expected one of"):
        hardware.pick_dtype("fp16")
