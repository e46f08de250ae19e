"""The real judge (Qwen2.5-Coder-1.5B-Instruct, assembled from its packages and verified) ranks the
validity ladder's replies of known quality in the known order, and the command-line scorer uses it."""
import json

import pytest

from utils import evaluation, judge as J, metrics, validity

# scoring the whole ladder takes about 22 minutes on 2 AVX2 cores (fp32): more than the default per-test limit
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


@pytest.fixture(scope="module")
def judge():
    return J.LLMJudge(J.DEFAULT_JUDGE)


@pytest.fixture(scope="module")
def ladder_result(judge):
    # scored once per machine, like the safety classifiers (about 22-40 minutes on 2 AVX2 cores), then
    # read from ~/.cache/lora-compare/validity/: the file is keyed by the judge's weights, dtype and
    # prompts, the ladder and the grading code, so any change to what the shares depend on scores it
    # afresh; delete that folder to force a new scoring
    result = evaluation.validity_cached(judge)
    shares = result["shares"]
    print("validity:", {s: round(shares[s]["share"], 3) for s in ("relevance", "coherence", "overall")},
          "good>wrong:", shares["good_vs_wrong"]["share"], "pairwise:", result["pairwise"]["share"],
          "dtype:", judge.dtype, "timing:", judge.timing_summary())
    return result


def test_relevance_coherence_and_pairwise_correctness_meet_the_target(ladder_result):
    shares = ladder_result["shares"]
    for score in ("relevance", "coherence"):
        assert shares[score]["n"] >= 20 * len(validity.ORDERS[score])
        assert shares[score]["share"] >= validity.TARGET, (score, shares[score]["pairs"])
    tiers = ladder_result["tier_means"]
    # the echoed prompt, the old scorer's favourite, now sits at the bottom on relevance
    assert tiers["echo"]["relevance"] < tiers["good"]["relevance"] - 1.5
    # word salad made of the good answer's own words: coherent no more
    assert tiers["shuffled"]["coherence"] < tiers["good"]["coherence"] - 1.5
    # good vs fluent-but-wrong, judged pairwise in both orders
    assert ladder_result["pairwise"]["n"] >= 20 and ladder_result["pairwise"]["share"] >= validity.TARGET


def test_every_grade_is_far_above_chance(ladder_result):
    assert ladder_result["shares"]["overall"]["share"] >= 0.85, ladder_result["shares"]["overall"]["pairs"]
    assert ladder_result["shares"]["good_vs_wrong"]["share"] >= 0.8


@pytest.mark.xfail(
    strict=True,
    reason="not met yet (measured 89.8% of 384 pairs, fp32 on AVX2): a terse correct answer "
    "ranks below a fluent wrong one (25%) and another question's answer (67%); see "
    "README, 'Is the judge right?'",
)
def test_overall_meets_the_target(ladder_result):
    assert ladder_result["shares"]["overall"]["share"] >= validity.TARGET


@pytest.mark.xfail(
    strict=True,
    reason="not met yet (measured 87.5%, 21 of 24, per reply; pairwise 91.7%): graded alone, "
    "the judge trusts fluent confident claims; see README, 'Is the judge right?'",
)
def test_per_reply_correctness_meets_the_target(ladder_result):
    assert ladder_result["shares"]["good_vs_wrong"]["share"] >= validity.TARGET


def test_score_command_on_the_real_judge(judge, tmp_path):
    rows = [{"prompt": "What is the capital of France?", "reply": "The capital of France is Paris."},
            {"prompt": "What is the capital of France?", "reply": "The capital of France is Madrid.",
             "reference": "Paris is the capital of France."}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = metrics.score_file(src, tmp_path / "out.jsonl", metrics.Scorer(metrics.Embedder(), judge))
    assert out[0]["overall"] > out[1]["overall"] + 1
    assert all(1 <= r[g] <= 5 for r in out for g in metrics.GRADES)
    assert "rouge_l" in out[1] and "rouge_l" not in out[0]


def test_a_category_rubric_line_does_not_lift_an_echoed_question(judge):
    # the domain suite is graded with its category's rubric line; placed between question and answer
    # that line made this judge grade it instead of the reply (an echoed question: 4.2-4.4 of 5)
    notes = evaluation.category_notes()
    rows = validity.ladder()
    ids = list(dict.fromkeys(r["id"] for r in rows))[:8]
    by = {(r["id"], r["tier"]): judge.grade(r["prompt"], r["reply"], notes[r["category"]])
          for r in rows if r["id"] in ids and r["tier"] in ("good", "echo")}
    assert len(by) == 16
    for i in ids:
        good, echo = by[(i, "good")], by[(i, "echo")]
        assert echo["overall"] < 2 < good["overall"] - 2, (i, echo["overall"], good["overall"])
        assert echo["relevance"] < good["relevance"] - 1.5, (i, echo["relevance"], good["relevance"])
