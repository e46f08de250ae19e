"""The real judge (Qwen2.5-Coder-1.5B-Instruct, assembled from its packages and verified) ranks the
validity ladder's replies of known quality in the known order, and the command-line scorer uses it."""
import json

import pytest

from utils import evaluation, judge as J, metrics, validity

# The whole-ladder study (240 replies, three passes each; about 30-57 minutes on 2 AVX2 cores in fp32) is
# `make validate`, run when the judge changes; its figures are in reports/example/validity_ladder.json.
# Here the real judge meets the ladder's hard part in a few minutes: every good vs fluent-but-wrong
# pair compared in both orders, and the first prompts' good, wrong, echoed and shuffled replies graded
# (grades are kept by content in the per-machine cache, so `make validate` reuses them and vice versa).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]
GRADED_PROMPTS = 8  # the ladder's first prompts, in file order
GRADED_TIERS = ("good", "wrong", "echo", "shuffled")


@pytest.fixture(scope="module")
def judge():
    return J.LLMJudge(J.DEFAULT_JUDGE)


@pytest.fixture(scope="module")
def ladder_rows():
    rows = validity.ladder()
    return {(r["id"], r["tier"]): r for r in rows}, list(dict.fromkeys(r["id"] for r in rows))


@pytest.fixture(scope="module")
def hard_pairs(judge, ladder_rows):
    by, ids = ladder_rows
    pairs = [(by[(i, validity.HARD_PAIR[0])], by[(i, validity.HARD_PAIR[1])]) for i in ids]
    verdicts = validity.judge_pairs(judge)(pairs)
    print("pairwise good vs wrong:", [v["verdict"] for v in verdicts], "timing:", judge.timing_summary())
    return verdicts


@pytest.fixture(scope="module")
def grades(judge, ladder_rows):
    by, ids = ladder_rows
    rows = [by[(i, t)] for i in ids[:GRADED_PROMPTS] for t in GRADED_TIERS]
    graded = validity.judge_scorer(judge)(rows)
    print("timing:", judge.timing_summary())
    return {(r["id"], r["tier"]): g for r, g in zip(rows, graded)}


def test_pairwise_good_beats_fluent_but_wrong_on_every_hard_pair_of_the_ladder(hard_pairs):
    # the same 24 pairs and the same verdict rule as the whole-ladder study (22 of 24 there, fp32, AVX2)
    assert len(hard_pairs) >= 20
    share = sum(v["verdict"] == "A" for v in hard_pairs) / len(hard_pairs)
    assert share >= validity.TARGET, [v["verdict"] for v in hard_pairs]


def test_each_criterion_ranks_the_known_worse_reply_lower(grades, ladder_rows):
    ids = ladder_rows[1][:GRADED_PROMPTS]

    def mean(tier, key):
        return sum(grades[(i, tier)][key] for i in ids) / len(ids)

    # relevance: the echoed question answers nothing, on every prompt
    for i in ids:
        assert grades[(i, "echo")]["relevance"] < grades[(i, "good")]["relevance"] - 1.5, i
    # coherence: word salad made of the good answer's own words is not coherent
    assert mean("shuffled", "coherence") < mean("good", "coherence") - 1.5
    # overall: fluent, on topic and wrong ranks below the good answer, graded alone
    right = sum(grades[(i, "good")]["overall"] > grades[(i, "wrong")]["overall"] for i in ids)
    assert right >= len(ids) - 1 and mean("wrong", "overall") < mean("good", "overall") - 1.0
    # the fact check is what moves it: the wrong tier keeps far less of its rubric grade
    assert mean("wrong", "correct_calibrated") < mean("good", "correct_calibrated") - 0.2


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
