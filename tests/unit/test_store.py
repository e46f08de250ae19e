"""Grades and verdicts kept by content (utils.store, used by the judge): a rerun reads what was
computed, a change to anything in the key computes afresh, and a damaged entry or file is named
in the log and computed again instead of crashing a run or feeding a wrong value."""
import json
import sqlite3

import pytest

from tiny import save_tiny_model
from utils import judge as J
from utils.store import ContentStore, _digest, code_key


def test_a_value_is_computed_once_and_read_back_in_a_new_process(tmp_path):
    calls = []
    compute = lambda: calls.append(1) or {"x": 1.5}  # noqa: E731
    first = ContentStore(tmp_path / "c.sqlite", "ns")
    assert first.get_or_compute("grade", ["q", "r"], compute) == {"x": 1.5}
    first.close()
    again = ContentStore(tmp_path / "c.sqlite", "ns")  # as a later run opens it
    assert again.get_or_compute("grade", ["q", "r"], compute) == {"x": 1.5}
    assert len(calls) == 1 and again.counts() == {"grade": {"kept": 1, "computed": 0}}
    # any part of the key changes the entry: namespace (judge, code), kind, or parts
    assert ContentStore(tmp_path / "c.sqlite", "other").get("grade", ["q", "r"]) is None
    assert again.get("prefer", ["q", "r"]) is None and again.get("grade", ["q", "r2"]) is None


# a changed value under its old digest; text that is not JSON; a value that fails the caller's check
@pytest.mark.parametrize("damage", ["value = '{\"x\": 9.0}'", "value = 'not json', digest = 'x'",
                                    "value = '{\"y\": 1}', digest = '" + _digest('{"y": 1}') + "'"])
def test_a_damaged_entry_is_named_ignored_and_recomputed(tmp_path, damage):
    logged = []
    path = tmp_path / "c.sqlite"
    store = ContentStore(path, "ns", log=logged.append)
    check = lambda v: isinstance(v, dict) and "x" in v  # noqa: E731
    store.put("grade", ["q", "r"], {"x": 1.5})
    with sqlite3.connect(path) as conn:
        conn.execute(f"UPDATE kept SET {damage}")
    assert store.get_or_compute("grade", ["q", "r"], lambda: {"x": 1.5}, check) == {"x": 1.5}
    assert len(logged) == 1 and "damaged grade entry" in logged[0] and "c.sqlite" in logged[0]
    # the recomputed value replaced the damaged one
    assert store.get("grade", ["q", "r"], check) == {"x": 1.5} and len(logged) == 1


def test_a_file_that_is_not_a_database_is_moved_aside_not_lost(tmp_path):
    logged = []
    path = tmp_path / "c.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    store = ContentStore(path, "ns", log=logged.append)
    assert store.get_or_compute("grade", ["q"], lambda: 2.0) == 2.0
    assert (tmp_path / "c.sqlite.damaged").read_bytes() == b"this is not sqlite" * 100
    assert len(logged) == 1 and "moved to c.sqlite.damaged" in logged[0]


def test_code_key_ignores_comments_but_not_code(tmp_path):
    path = tmp_path / "m.py"
    path.write_text('"""Doc."""\nX = 1  # note\n')
    base = code_key(path)
    path.write_text('X = 1\n')
    assert code_key(path) == base
    path.write_text('X = 2\n')
    assert code_key(path) != base


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("judge") / "llama", "llama")


def test_the_judge_reads_kept_grades_and_verdicts_and_recomputes_a_damaged_one(tiny_path, tmp_path):
    judge = J.LLMJudge(str(tiny_path), dtype="fp32")
    logged = []
    judge.store = ContentStore(tmp_path / "verdicts.sqlite", judge.store.namespace, log=logged.append)
    fresh = judge.grade("how are you?", "fine thanks")
    p = judge.prefer("how are you?", "fine thanks", "blue")
    calls = (judge.timing["grade"].calls, judge.timing["pair"].calls)
    assert judge.grade("how are you?", "fine thanks") == fresh and judge.prefer("how are you?", "fine thanks",
                                                                                "blue") == p
    assert (judge.timing["grade"].calls, judge.timing["pair"].calls) == calls  # read, not computed
    assert judge.timing_summary()["cache"] == {"grade": {"kept": 1, "computed": 1},
                                               "prefer": {"kept": 1, "computed": 1}}
    # another note, reply or order is another entry
    judge.grade("how are you?", "fine thanks", "a note")
    judge.prefer("how are you?", "blue", "fine thanks")
    assert judge.timing["grade"].calls == calls[0] + 1 and judge.timing["pair"].calls == calls[1] + 1
    # an out-of-range grade stored under the right digest: refused by the check, recomputed, logged
    with sqlite3.connect(judge.store.path) as conn:
        for key, value in conn.execute("SELECT key, value FROM kept WHERE kind = 'grade'").fetchall():
            bad = json.dumps({**json.loads(value), "coherence": 17.0})
            conn.execute("UPDATE kept SET value = ?, digest = ? WHERE key = ?", (bad, _digest(bad), key))
    again = judge.grade("how are you?", "fine thanks")
    assert any("damaged grade entry" in line for line in logged)
    assert {k: again[k] for k in (*J.CRITERIA, "correct")} == pytest.approx({k: fresh[k] for k in (*J.CRITERIA,
                                                                                                   "correct")})


def test_the_judges_cache_namespace_changes_with_its_prompts(tiny_path, monkeypatch):
    base = J.LLMJudge(str(tiny_path), dtype="fp32").store.namespace
    monkeypatch.setattr(J, "PAIR_QUESTION", J.PAIR_QUESTION + " Think.")
    assert J.LLMJudge(str(tiny_path), dtype="fp32").store.namespace != base


def test_valid_grade_refuses_what_the_judge_cannot_produce():
    good = {**{c: 3.0 for c in J.CRITERIA}, **{f"{c}_probs": [0.2] * 5 for c in J.CRITERIA},
            "correct": 0.5, "correct_calibrated": 0.4, "overall_rubric": 3.2}
    assert J.valid_grade(good)
    for bad in ({**good, "overall": 0.0}, {**good, "relevance_probs": [0.5] * 5}, {**good, "correct": 1.2},
                {k: v for k, v in good.items() if k != "coherence"}, [1, 2], None):
        assert not J.valid_grade(bad)


def test_a_stopped_grading_resumes_where_it_stopped(tiny_path, tmp_path):
    """Each batch is kept as it is made: a run stopped after two batches loses nothing of them, and
    the next run (a new process: a new judge on the same file) computes only the rest."""
    items = [(f"question {i}?", f"answer number {i}" + " more" * i, None) for i in range(2 * J.BATCH + 3)]

    def judge_counting(stop_after=None):
        judge = J.LLMJudge(str(tiny_path), dtype="fp32")
        judge.store = ContentStore(tmp_path / "verdicts.sqlite", judge.store.namespace)
        real, judge.computed = judge._grade_batch, []

        def counting(pairs, note):
            if stop_after is not None and len(judge.computed) == stop_after:
                raise KeyboardInterrupt("stopped")
            judge.computed.append(len(pairs))
            return real(pairs, note)

        judge._grade_batch = counting
        return judge

    stopped = judge_counting(stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        stopped.grade_many(items)
    stopped.store.close()
    resumed = judge_counting()
    grades = resumed.grade_many(items)
    assert sum(resumed.computed) == len(items) - 2 * J.BATCH
    whole = J.LLMJudge(str(tiny_path), dtype="fp32").grade_many(items)  # one uninterrupted run, memory only
    assert [g["overall"] for g in grades] == pytest.approx([g["overall"] for g in whole], abs=1e-4)
