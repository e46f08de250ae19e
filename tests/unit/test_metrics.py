"""Metric functions against hand-computed values, and the statistics."""

import numpy as np
import json

import pytest

from utils import metrics


def test_rouge_l_by_hand():
    # LCS of "the cat sat" and "the cat is here" = "the cat" (2); P = 2/3, R = 2/4, F = 2PR/(P+R) = 4/7
    assert metrics.rouge_l("the cat sat", "the cat is here") == pytest.approx(4 / 7)
    assert metrics.rouge_l("identical words", "identical words") == 1
    assert metrics.rouge_l("nothing shared", "completely different") == 0


def test_chrf_bounds():
    assert metrics.chrf("the same sentence", "the same sentence") == pytest.approx(100)
    assert metrics.chrf("xyz", "abc") == 0
    assert 0 < metrics.chrf("the cat sat", "the cat sits") < 100


def test_distinct_n_by_hand():
    # tokens: a b a b a b -> bigrams ab ba ab ba ab: 2 unique of 5
    assert metrics.distinct_n("a b a b a b", 2) == pytest.approx(2 / 5)
    assert metrics.distinct_n("one two three", 2) == 1
    assert metrics.distinct_n("", 2) == 0


def test_bootstrap_ci_contains_mean_and_reports_n():
    ci = metrics.bootstrap_ci([1, 2, 3, 4, 5], seed=1)
    assert ci["mean"] == 3 and ci["n"] == 5
    assert 1 <= ci["low"] < 3 < ci["high"] <= 5
    const = metrics.bootstrap_ci([2.0] * 10)
    assert const["low"] == const["high"] == 2
    assert metrics.bootstrap_ci([None, None])["n"] == 0


def test_bootstrap_ci_narrows_with_n():
    rng = np.random.default_rng(0)
    small = metrics.bootstrap_ci(rng.normal(size=20))
    large = metrics.bootstrap_ci(rng.normal(size=2000))
    assert (large["high"] - large["low"]) < (small["high"] - small["low"]) / 5


def test_win_rate_counts_ties_half():
    w = metrics.win_rate([3, 2, 1, 5], [1, 2, 4, 4])  # win, tie, loss, win
    assert (w["wins"], w["ties"], w["losses"], w["n"]) == (2, 1, 1, 4)
    assert w["win_rate"] == pytest.approx(2.5 / 4)
    with pytest.raises(ValueError, match="differ in length"):
        metrics.win_rate([1, 2], [1])


def test_paired_difference():
    d = metrics.paired_difference([3, 4, None, 5], [1, 4, 2, 3])
    assert d["n"] == 3 and d["mean"] == pytest.approx(4 / 3)
    with pytest.raises(ValueError, match="differ in length"):
        metrics.paired_difference([1, 2], [1])


# --------------------------------------------------------------------------- the scorer and its command line


class FakeJudge:
    """Grades by reply length, so the test can check where each grade lands."""

    def grade(self, prompt, reply, note=None):
        g = min(5.0, 1.0 + len(reply.split()))
        return {"relevance": g, "coherence": g, "overall": g, "judge_seconds": 0.0, "seen_note": note}


def test_scorer_keeps_cheap_signals_apart_from_grades():
    rows = metrics.Scorer(None, FakeJudge()).score(["q1", "q2"], ["one two", "a a a a"], ["one two", None],
                                                   [None, "be kind"])
    assert rows[0]["overall"] == 3 and rows[1]["overall"] == 5
    assert rows[0]["rouge_l"] == 1 and "rouge_l" not in rows[1]  # reference metrics only where a reference exists
    assert rows[1]["distinct_2"] == pytest.approx(1 / 3)
    # the note reaches the judge; the reference feeds the reference metrics only (shown to this judge it was
    # graded in place of the reply)
    assert rows[0]["seen_note"] is None and rows[1]["seen_note"] == "be kind"
    no_judge = metrics.Scorer(None, None).score(["q"], ["r"])
    assert "overall" not in no_judge[0] and no_judge[0]["words"] == 1


def test_score_file_writes_rows_back_with_scores(tmp_path, write_jsonl):
    src = write_jsonl("in.jsonl", [{"prompt": "hi", "reply": "hello there", "id": 7},
                                   {"prompt": "q", "reply": "", "reference": "ref"}])
    out = metrics.score_file(src, tmp_path / "out.jsonl", metrics.Scorer(None, FakeJudge()))
    back = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert back == out and back[0]["id"] == 7 and back[0]["overall"] == 3 and back[1]["chrf"] == 0


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "a", "reply": "b"}', '{"prompt": "a", "reply": '], r"in.jsonl:2: not valid JSON"),
    (['{"prompt": "a"}'], r"in.jsonl:1: field 'reply' is missing; expected a string"),
    (['{"prompt": "a", "reply": 3}'], r"in.jsonl:1: field 'reply' is int; expected a string"),
    (['[1, 2]'], r"in.jsonl:1: expected a JSON object, got list"),
    (['{"prompt": " ", "reply": "b"}'], r"in.jsonl:1: field 'prompt' is empty"),
    (['{"prompt": "a", "reply": "b", "reference": 5}'], r"in.jsonl:1: field 'reference' is int"),
    ([''], r"in.jsonl: no rows"),
])
def test_bad_input_names_file_and_line(write_jsonl, lines, message):
    with pytest.raises(metrics.ScoreInputError, match=message):
        metrics.read_score_input(write_jsonl("in.jsonl", lines))


def test_command_line_stops_on_bad_input_before_loading_the_judge(write_jsonl, tmp_path, capsys, monkeypatch):
    from utils import judge

    monkeypatch.setattr(judge, "LLMJudge", lambda *a, **k: pytest.fail("the judge was loaded"))
    src = write_jsonl("in.jsonl", ['{"prompt": "a"}'])
    assert metrics.main(["score", str(src), str(tmp_path / "out.jsonl")]) == 2
    assert "in.jsonl:1: field 'reply' is missing" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_output_may_not_overwrite_the_input(write_jsonl):
    src = write_jsonl("in.jsonl", [{"prompt": "a", "reply": "b"}])
    with pytest.raises(metrics.ScoreInputError, match="would overwrite the input"):
        metrics.score_file(src, src, metrics.Scorer(None, FakeJudge()))
    assert json.loads(src.read_text()) == {"prompt": "a", "reply": "b"}


def test_interval_text_formats_every_kind_of_summary():
    from utils.metrics import interval_text

    s = {"mean": 0.4213, "low": 0.3, "high": 0.55, "n": 9}
    assert interval_text(s) == "0.42 [0.30, 0.55]"
    assert interval_text(s, 1, signed=True) == "+0.4 [+0.3, +0.6]"
    assert interval_text({"ci_low": 1.0, "ci_high": 2.0}, 3, keys=(None, "ci_low", "ci_high")) == "[1.000, 2.000]"
    assert interval_text({"win_rate": 0.5, "low": 0.25, "high": 0.75}, keys=("win_rate", "low", "high"),
                         wrap=lambda b: f"<i>{b}</i>") == "0.50 <i>[0.25, 0.75]</i>"
    assert interval_text({"mean": None, "low": None, "high": None, "n": 0}) == "–" == interval_text(None)


def test_seconds_per_reply_counts_every_pass_of_the_judge():
    timing = {"grade": {"calls": 4, "seconds": 20.0}, "correct": {"calls": 4, "seconds": 8.0},
              "pair": {"calls": 2, "seconds": 9.0}}
    assert metrics.seconds_per_reply(timing) == 7.0  # (20 + 8) / 4; pairwise comparisons are not replies
    assert metrics.seconds_per_reply({"grade": {"calls": 3, "seconds": 6.0}}) == 2.0
    assert metrics.seconds_per_reply({"grade": {"calls": 0, "seconds": 0.0}}) is None


def _verdicts_by_length(seed: int, n: int = 64, a_longer: float = 0.8):
    """Reply lengths of A and B for n prompts, A the longer in about ``a_longer`` of them."""
    rng = np.random.default_rng(seed)
    la = rng.integers(10, 90, n)
    lb = np.where(rng.random(n) < a_longer, la - rng.integers(1, 40, n), la + rng.integers(1, 40, n))
    return rng, la, lb


@pytest.mark.parametrize("seed", range(5))
def test_length_controlled_win_rate_sees_through_length(seed):
    """The longer reply always wins, and A is the longer in ~80% of prompts: the raw win rate is high,
    the length-controlled one near 0.5, its interval holding 0.5; the slope says longer wins."""
    _, la, lb = _verdicts_by_length(seed)
    outcome = (la > lb).astype(float)
    raw = metrics.win_rate(outcome, 1 - outcome)
    lc = metrics.length_controlled_win_rate(outcome, la, lb, n_boot=300, seed=seed)
    assert raw["low"] > 0.6
    assert abs(lc["win_rate"] - 0.5) < 0.1 and lc["low"] <= 0.5 <= lc["high"], lc
    assert lc["length_slope"] > 0 and lc["n"] == len(la)


@pytest.mark.parametrize("seed", range(5))
def test_length_controlled_win_rate_keeps_a_real_advantage(seed):
    """A wins 80% whatever the lengths: the controlled rate stays with the raw one and excludes 0.5;
    with ties as halves and noise in the judge (the longer wins 85%), it falls back towards 0.5."""
    rng, la, lb = _verdicts_by_length(seed)
    better = (rng.random(la.size) < 0.8).astype(float)
    lc = metrics.length_controlled_win_rate(better, la, lb, n_boot=300, seed=seed)
    assert abs(lc["win_rate"] - better.mean()) < 0.05 and lc["low"] > 0.5
    noisy = np.where(rng.random(la.size) < 0.85, (la > lb).astype(float), (la < lb).astype(float))
    noisy = np.where(rng.random(la.size) < 0.2, 0.5, noisy)
    raw = metrics.win_rate(noisy, 1 - noisy)
    assert metrics.length_controlled_win_rate(noisy, la, lb, n_boot=300)["win_rate"] < raw["win_rate"] - 0.05


def test_length_controlled_win_rate_edge_cases():
    assert metrics.length_controlled_win_rate([], [], [])["win_rate"] is None
    same = metrics.length_controlled_win_rate([1, 1, 0.5], [10, 20, 30], [10, 20, 30], n_boot=50)
    assert same["win_rate"] == pytest.approx(2.5 / 3) and same["length_slope"] is None  # nothing to control
    with pytest.raises(ValueError, match="differ in number"):
        metrics.length_controlled_win_rate([1, 0], [1], [2])
