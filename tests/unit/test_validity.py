"""The validity ladder and its arithmetic: what is a known order, and how a share is counted."""
import pytest

from utils import validity as V


def test_ladder_has_every_tier_for_every_prompt():
    rows = V.ladder()
    ids = {r["id"] for r in rows}
    assert len(ids) >= 20
    assert len(rows) == len(ids) * len(V.TIERS)
    by = {(r["id"], r["tier"]): r["reply"] for r in rows}
    for i in ids:
        good = by[(i, "good")]
        assert sorted(by[(i, "shuffled")].split()) == sorted(good.split()) and by[(i, "shuffled")] != good
        assert by[(i, "empty")] == "" and by[(i, "off_topic")] != good
        assert len(set(by[(i, t)] for t in V.TIERS)) == len(V.TIERS)  # ten different replies


def level(tier, pairs):
    """Length of the longest chain of known orders below ``tier``: a score consistent with all of them."""
    below = [lo for hi, lo in pairs if hi == tier]
    return 1 + max((level(lo, pairs) for lo in below), default=0)


def test_a_scorer_that_knows_the_order_gets_everything_right():
    rows = V.ladder()
    scores = [{score: float(level(r["tier"], pairs)) for score, pairs in V.ORDERS.items()} for r in rows]
    shares = V.pair_shares(rows, scores)
    for score in V.ORDERS:
        assert shares[score]["share"] == 1.0, score
        assert shares[score]["n"] == len(V.ORDERS[score]) * len({r["id"] for r in rows})
    assert shares["good_vs_wrong"]["share"] == 1.0


def test_ties_count_as_wrong_and_inversions_as_zero():
    rows = V.ladder()
    const = V.pair_shares(rows, [{"relevance": 3.0, "coherence": 3.0, "overall": 3.0} for _ in rows])
    assert all(const[s]["share"] == 0 for s in V.ORDERS)
    echo_wins = [{"relevance": 5.0 if r["tier"] == "echo" else 3.0, "coherence": 3, "overall": 3} for r in rows]
    rel = V.pair_shares(rows, echo_wins)["relevance"]
    assert rel["pairs"]["good > echo"]["share"] == 0 and rel["pairs"]["good > evasive"]["share"] == 0


def test_missing_reply_in_the_ladder_is_named(tmp_path):
    path = tmp_path / "ladder.yaml"
    path.write_text("prompts:\n- {id: x, prompt: hi, good: a, terse: b, evasive: c, wrong: d}\n")
    with pytest.raises(V.LadderError, match=r"prompts\[0\] \(x\) lacks \['topical'\]"):
        V.ladder(path)


class RecordingJudge:
    """Records what each grade and comparison was given."""

    def __init__(self):
        self.notes, self.pairs = [], []

    def grade(self, prompt, reply, note=None):
        self.notes.append(note)
        return {"relevance": 3.0, "coherence": 3.0, "overall": 3.0}

    def compare(self, prompt, a, b):
        self.pairs.append(prompt)
        return {"verdict": "A", "p_a": 0.9}


def test_with_notes_each_reply_is_graded_with_its_category_rubric_line():
    from utils.evaluation import category_notes, load_domain_suite

    notes = category_notes()
    assert set(notes) == {it["category"] for it in load_domain_suite()}
    assert {notes[it["category"]] for it in load_domain_suite()} == {it["note"] for it in load_domain_suite()}
    rows = V.ladder()
    assert all(r["category"] in notes for r in rows)  # every ladder prompt names a suite category
    judge = RecordingJudge()
    V.run(V.judge_scorer(judge, notes), pair_fn=V.judge_pairs(judge))
    assert judge.notes == [notes[r["category"]] for r in rows]
    assert len(judge.pairs) == len({r["id"] for r in rows})  # pairwise: no rubric line (judge.NOTE_LEAD)
    plain = RecordingJudge()
    V.run(V.judge_scorer(plain))
    assert set(plain.notes) == {None}


def test_grading_with_notes_needs_a_known_category_before_any_grade(tmp_path):
    path = tmp_path / "ladder.yaml"
    path.write_text("prompts:\n- {id: x, category: cooking, prompt: hi, good: a, terse: b, evasive: c, wrong: d, "
                    "topical: e}\n")
    judge = RecordingJudge()
    with pytest.raises(V.LadderError, match=r"'x' has category 'cooking'; grading with notes needs one of"):
        V.run(V.judge_scorer(judge, {"factual": "be right"}), path)
    assert judge.notes == []
