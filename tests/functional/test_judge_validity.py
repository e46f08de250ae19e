"""The real judge (Qwen2.5-Coder-1.5B-Instruct, assembled from its packages and verified) ranks the
validity ladder's replies of known quality in the known order, and the command-line scorer uses it."""
import json

import pytest

from utils import evaluation, judge as J, metrics, validity

# scoring the whole ladder takes about 20 minutes on 2 AVX2 cores (fp32): more than the default per-test limit
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


@pytest.fixture(scope="module")
def judge():
    return J.LLMJudge(J.DEFAULT_JUDGE)


@pytest.fixture(scope="module")
def ladder_result(judge, tmp_path_factory):
    # a fresh cache: the ladder is scored now, in this test, never read from an earlier run
    result = evaluation.validity_cached(judge, cache_root=tmp_path_factory.mktemp("validity"))
    shares = result["shares"]
    print("validity:", {s: round(shares[s]["share"], 3) for s in ("relevance", "coherence", "overall")},
          "good>wrong:", shares["good_vs_wrong"]["share"], "pairwise:", result["pairwise"]["share"],
          "dtype:", judge.dtype, "timing:", judge.timing_summary())
    return result


def test_relevance_and_pairwise_correctness_meet_the_target(ladder_result):
    shares = ladder_result["shares"]
    assert shares["relevance"]["n"] >= 20 * len(validity.ORDERS["relevance"])
    assert shares["relevance"]["share"] >= validity.TARGET, shares["relevance"]["pairs"]
    # the echoed prompt, the old scorer's favourite, now sits at the bottom on relevance
    tiers = ladder_result["tier_means"]
    assert tiers["echo"]["relevance"] < tiers["good"]["relevance"] - 1.5
    # good vs fluent-but-wrong, judged pairwise in both orders
    assert ladder_result["pairwise"]["n"] >= 20 and ladder_result["pairwise"]["share"] >= validity.TARGET


def test_every_grade_is_far_above_chance(ladder_result):
    for score in ("coherence", "overall"):
        assert ladder_result["shares"][score]["share"] >= 0.8, ladder_result["shares"][score]["pairs"]
    assert ladder_result["shares"]["good_vs_wrong"]["share"] >= 0.75


@pytest.mark.xfail(strict=True, reason="not met yet (measured 86% coherence, 88% overall, 87.5% good vs wrong per "
                                      "reply): the judge rates scrambled words of a long answer as coherent and a terse "
                                      "correct answer below a fluent wrong one; see README, 'Is the judge right?'")
def test_coherence_overall_and_per_reply_correctness_meet_the_target(ladder_result):
    shares = ladder_result["shares"]
    for score in ("coherence", "overall", "good_vs_wrong"):
        assert shares[score]["share"] >= validity.TARGET, (score, shares[score])


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
