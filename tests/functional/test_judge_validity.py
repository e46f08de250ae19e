"""The real judge (Qwen2.5-Coder-1.5B-Instruct, assembled from its packages and verified) ranks the
validity ladder's replies of known quality in the known order, and the command-line scorer uses it."""
import json

import pytest

from utils import evaluation, judge as J, metrics, validity

# scoring the whole ladder takes about 57 minutes on 2 AVX2 cores (fp32, three passes): beyond the default limit
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


def test_overall_meets_the_target(ladder_result):
    # 94.3% of 384 with the fact-check pass (2026-11-30, fp32 on AVX2); 89.8% without it
    assert ladder_result["shares"]["overall"]["share"] >= validity.TARGET, ladder_result["shares"]["overall"]["pairs"]


def test_per_reply_correctness_meets_the_target(ladder_result):
    # good above fluent-but-wrong, each graded alone: 22 of 24 with the fact-check pass, 21 without
    assert ladder_result["shares"]["good_vs_wrong"]["share"] >= validity.TARGET
    # the fact check is what moves it: the wrong tier keeps far less of its rubric grade than the good one
    tiers = ladder_result["tier_means"]
    assert tiers["wrong"]["correct_calibrated"] < tiers["good"]["correct_calibrated"] - 0.2


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
        # the rubric pass, where the line sits (since 2026-11-30 ``overall`` also folds in the fact check,
        # which lowers every grade: its mean for good answers fell from 4.49 to 4.06)
        assert echo["overall_rubric"] < 2 < good["overall_rubric"] - 2, (i, echo["overall_rubric"],
                                                                         good["overall_rubric"])
        assert echo["overall"] < 2 and echo["overall"] < good["overall"] - 1.5, (i, echo["overall"], good["overall"])
        assert echo["relevance"] < good["relevance"] - 1.5, (i, echo["relevance"], good["relevance"])
