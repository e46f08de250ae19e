"""The real judge (Qwen2.5-Coder-1.5B-Instruct, assembled from its packages and verified) ranks the
validity ladder's replies of known quality in the known order, and the command-line scorer uses it."""
import json

import pytest

from utils import evaluation, judge as J, metrics, validity

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def judge():
    return J.LLMJudge(J.DEFAULT_JUDGE)


def test_judge_ranks_known_order_pairs_right(judge, tmp_path):
    result = evaluation.validity_cached(judge, cache_root=tmp_path)  # a fresh cache: scored now, in this test
    shares = result["shares"]
    report = {s: round(shares[s]["share"], 3) for s in ("relevance", "coherence", "overall")}
    report["good_vs_wrong"] = round(shares["good_vs_wrong"]["share"], 3)
    print("validity:", report, "dtype:", judge.dtype, "timing:", judge.timing_summary()["grade"])
    for score in ("relevance", "coherence", "overall"):
        assert shares[score]["n"] >= 20 * len(validity.ORDERS[score])
        assert shares[score]["share"] >= validity.TARGET, (score, shares[score]["pairs"])
    assert shares["good_vs_wrong"]["share"] >= validity.TARGET, shares["good_vs_wrong"]
    # the echoed prompt, the old scorer's favourite, now sits at the bottom on relevance
    tiers = result["tier_means"]
    assert tiers["echo"]["relevance"] < tiers["good"]["relevance"] - 1.5


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
