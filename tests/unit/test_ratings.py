"""The SQLite rating store and the leaderboard maths against hand-computed values."""
import sqlite3

import numpy as np
import pytest

from utils import ratings


def _vote(a, b, vote, **kw):
    return {"model_a": a, "model_b": b, "vote": vote, **kw}


def test_store_writes_and_reads_back(tmp_path):
    store = ratings.RatingStore(tmp_path / "r.sqlite")
    vid = store.add_vote("hi?", "m1", "m2", "hello", "hey", "A", {"max_new_tokens": 32},
                         {"coherence_a": 4, "relevance_a": 5}, {"coherence_a": 3.5, "relevance_a": 4.2})
    rows = store.votes()
    assert vid == 1 and len(rows) == 1
    row = rows[0]
    assert (row["prompt"], row["model_a"], row["output_b"], row["vote"]) == ("hi?", "m1", "hey", "A")
    assert row["coherence_a"] == 4 and row["coherence_b"] is None and row["auto_relevance_a"] == pytest.approx(4.2)
    assert '"max_new_tokens": 32' in row["settings"] and row["created_utc"].endswith("+00:00")
    # a second store object on the same file sees the same data (the path is the database)
    assert len(ratings.RatingStore(tmp_path / "r.sqlite").votes()) == 1


def test_store_keeps_no_pii_of_what_people_typed(tmp_path):
    store = ratings.RatingStore(tmp_path / "r.sqlite")
    store.add_vote("I'm jane.doe@example.com, call me on +44 20 7946 0958", "m1", "m2",
                   "Write to jane.doe@example.com", "Card 4111 1111 1111 1111 noted", "tie")
    raw = (tmp_path / "r.sqlite").read_bytes()
    for secret in (b"jane.doe@example.com", b"7946 0958", b"4111 1111 1111 1111"):
        assert secret not in raw
    row = store.votes()[0]
    assert row["prompt"] == "I'm <EMAIL>, call me on <PHONE>"
    assert row["output_a"] == "Write to <EMAIL>" and row["output_b"] == "Card <CARD> noted"


def test_purge_deletes_older_votes_for_good(tmp_path, capsys):
    db = tmp_path / "r.sqlite"
    store = ratings.RatingStore(db)
    store.add_vote("an old question about tulips", "m1", "m2", "x", "y", "A")
    store.add_vote("a new question", "m1", "m2", "x", "y", "B")
    with sqlite3.connect(db) as con:
        con.execute("UPDATE votes SET created_utc = '2026-01-05T10:00:00+00:00' WHERE id = 1")
    assert ratings.main(["purge", "--before", "2026-02-01", "--db", str(db)]) == 0
    assert "deleted 1 vote(s); 1 remain" in capsys.readouterr().out
    assert [v["prompt"] for v in store.votes()] == ["a new question"]
    assert b"tulips" not in db.read_bytes()  # compacted: the deleted text is not left in free pages
    assert ratings.main(["purge", "--all", "--db", str(db)]) == 0 and store.votes() == []


def test_purge_refuses_a_bad_date_or_a_missing_store(tmp_path, capsys):
    db = tmp_path / "r.sqlite"
    ratings.RatingStore(db).add_vote("q", "m1", "m2", "x", "y", "A")
    with pytest.raises(SystemExit):
        ratings.main(["purge", "--before", "last tuesday", "--db", str(db)])
    assert "--before='last tuesday': expected an ISO date" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ratings.main(["purge", "--all", "--db", str(tmp_path / "none.sqlite")])
    assert "no rating store there" in capsys.readouterr().err
    assert len(ratings.RatingStore(db).votes()) == 1  # nothing lost
    with pytest.raises(ValueError, match="expected an ISO date"):
        ratings.parse_date("2026-13-45")
    assert ratings.parse_date("2026-12-01").tzinfo is not None


def test_store_refuses_bad_votes_and_ratings(tmp_path):
    store = ratings.RatingStore(tmp_path / "r.sqlite")
    with pytest.raises(ValueError, match=r"vote='C'; expected one of \['A', 'B', 'tie', 'both_bad'\]"):
        store.add_vote("p", "a", "b", "x", "y", "C")
    with pytest.raises(ValueError, match="rating coherence_a=6; expected an integer from 1 to 5"):
        store.add_vote("p", "a", "b", "x", "y", "A", ratings={"coherence_a": 6})
    with sqlite3.connect(tmp_path / "r.sqlite") as con:  # the schema enforces it too
        with pytest.raises(sqlite3.IntegrityError):
            con.execute("INSERT INTO votes (created_utc, prompt, model_a, model_b, output_a, output_b, settings, vote)"
                        " VALUES ('t', 'p', 'a', 'b', 'x', 'y', '{}', 'nope')")
    assert store.votes() == []


def test_wilson_interval_by_hand():
    low, high = ratings.wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)
    assert ratings.wilson_interval(0, 0) == (0.0, 1.0)


def test_win_rates_count_ties_half():
    votes = [_vote("x", "y", "A"), _vote("y", "x", "tie"), _vote("x", "y", "both_bad"), _vote("y", "x", "A")]
    wr = ratings.win_rates(votes)
    assert wr["x"]["games"] == 4 and wr["x"]["wins"] == 1.5 and wr["x"]["win_rate"] == pytest.approx(0.375)
    assert wr["y"]["wins"] == 1.5


def test_arena_ratings_order_and_keep_an_unbeaten_model_finite():
    votes = [_vote("a", "b", "A")] * 3 + [_vote("b", "c", "A")] * 3
    r = ratings.arena_ratings(votes, n_boot=50)["models"]
    assert r["a"]["rating"] > r["b"]["rating"] > r["c"]["rating"] and all(abs(v["rating"]) < 5000 for v in r.values())
    assert all(v["interval"][0] <= v["rating"] <= v["interval"][1] for v in r.values())
    assert sum(v["rating"] - 1000 for v in r.values()) == pytest.approx(0, abs=1e-6)


def test_arena_ratings_length_control_sees_through_verbosity():
    """Voters prefer the longer reply (the chance rises with the normalised length difference, as the
    style control models it) and neither model is better; "long" writes longer in most games. The plain
    rating puts "long" well ahead; the length-controlled one puts them close, intervals overlapping."""
    import numpy as np

    rng = np.random.default_rng(0)
    votes = []
    for _ in range(300):
        la, lb = int(rng.integers(40, 120)), int(rng.integers(10, 70))  # "long" and "short" reply lengths
        p_long = 1 / (1 + np.exp(-8 * (la - lb) / (la + lb)))
        long_won = rng.random() < p_long
        if rng.random() < 0.5:
            votes.append({**_vote("long", "short", "A" if long_won else "B"), "output_a": "w " * la,
                          "output_b": "w " * lb})
        else:
            votes.append({**_vote("short", "long", "B" if long_won else "A"), "output_a": "w " * lb,
                          "output_b": "w " * la})
    arena = ratings.arena_ratings(votes, n_boot=100)
    r = arena["models"]
    raw_gap = r["long"]["rating"] - r["short"]["rating"]
    assert raw_gap > 150 and r["long"]["interval"][0] > r["short"]["interval"][1]
    assert abs(r["long"]["controlled"] - r["short"]["controlled"]) < 0.25 * raw_gap
    assert r["long"]["controlled_interval"][0] < r["short"]["controlled_interval"][1]
    assert arena["length_coef"] > 0


def test_agreement_spearman():
    votes = [{"coherence_a": h, "auto_coherence_a": a, "coherence_b": None, "auto_coherence_b": None,
              "relevance_a": None, "auto_relevance_a": None, "relevance_b": None, "auto_relevance_b": None}
             for h, a in [(1, 1.2), (2, 2.5), (3, 2.9), (4, 4.4), (5, 4.1)]]
    agree = ratings.agreement(votes)
    assert agree["coherence"]["n"] == 5 and agree["coherence"]["spearman"] == pytest.approx(0.9)
    assert agree["coherence"]["low"] <= 0.9 <= agree["coherence"]["high"] <= 1
    assert agree["relevance"] == {"spearman": None, "p_value": None, "n": 0, "low": None, "high": None}
    assert ratings.agreement_text(agree) == (f"coherence: 0.90 [{agree['coherence']['low']:.2f}, "
                                             f"{agree['coherence']['high']:.2f}] (n=5); relevance: not enough rated "
                                             "replies (n=0)")


def test_spearman_interval_narrows_with_n():
    rng = np.random.default_rng(0)
    x = rng.normal(size=400)
    y = x + rng.normal(size=400)
    small, large = ratings.spearman_interval(x[:20], y[:20]), ratings.spearman_interval(x, y)
    assert large[1] - large[0] < small[1] - small[0]
    assert large[0] < 0.69 < large[1]  # rho of x and x + noise with equal variances: 6/pi * asin(1/(2*sqrt(2)))


def test_report_includes_agreement_once_ratings_exist(tmp_path):
    from utils import report

    assert report.human_agreement(tmp_path / "none.sqlite") is None
    store = ratings.RatingStore(tmp_path / "r.sqlite")
    assert report.human_agreement(tmp_path / "r.sqlite") is None  # exists but empty
    for human, auto in [(1, 1.5), (3, 2.5), (5, 4.0), (2, 2.2)]:
        store.add_vote("p", "a", "b", "x", "y", "A", ratings={"coherence_a": human}, auto={"coherence_a": auto})
    got = report.human_agreement(tmp_path / "r.sqlite")
    assert got["votes"] == 4 and got["agreement"]["coherence"]["spearman"] == pytest.approx(1.0)
    assert got["agreement"]["coherence"]["n"] == 4
