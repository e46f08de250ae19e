"""Blind-arena votes and ratings in SQLite, and the leaderboard maths.

What is stored, per vote: UTC time, the prompt, both outputs, the generation settings, the
true identities of both sides, the vote (A / B / tie / both_bad) and optional 1-5 coherence and
relevance ratings of each side, plus the judge's grades of each side (``utils.judge``) when a judge was loaded.
Nothing about the person voting (no name, address or session id) is stored. Prompts and outputs
are stored PII-redacted (``utils.pii``, the same redaction as the data).

    python -m utils.ratings purge --before 2026-12-01 [--db FILE]   # delete older votes for good
    python -m utils.ratings purge --all [--db FILE]                 # delete every vote
"""
from __future__ import annotations

import json
import math
import sqlite3
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import pii
from .metrics import interval_text
from .paths import DATA_DIR

DEFAULT_DB = DATA_DIR / "ratings.sqlite"
VOTES = ("A", "B", "tie", "both_bad")

SCHEMA = """
CREATE TABLE IF NOT EXISTS votes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_utc TEXT NOT NULL,
    prompt TEXT NOT NULL,
    model_a TEXT NOT NULL,
    model_b TEXT NOT NULL,
    output_a TEXT NOT NULL,
    output_b TEXT NOT NULL,
    settings TEXT NOT NULL,
    vote TEXT NOT NULL CHECK (vote IN ('A', 'B', 'tie', 'both_bad')),
    coherence_a INTEGER CHECK (coherence_a BETWEEN 1 AND 5),
    relevance_a INTEGER CHECK (relevance_a BETWEEN 1 AND 5),
    coherence_b INTEGER CHECK (coherence_b BETWEEN 1 AND 5),
    relevance_b INTEGER CHECK (relevance_b BETWEEN 1 AND 5),
    auto_coherence_a REAL, auto_relevance_a REAL, auto_coherence_b REAL, auto_relevance_b REAL
);
"""


class RatingStore:
    def __init__(self, path: str | Path = DEFAULT_DB):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as con:
            con.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30)
        con.row_factory = sqlite3.Row
        return con

    def add_vote(self, prompt: str, model_a: str, model_b: str, output_a: str, output_b: str, vote: str,
                 settings: dict | None = None, ratings: dict | None = None, auto: dict | None = None) -> int:
        if vote not in VOTES:
            raise ValueError(f"vote={vote!r}; expected one of {list(VOTES)}")
        ratings, auto = ratings or {}, auto or {}
        for key, value in ratings.items():
            if value is not None and not (isinstance(value, int) and 1 <= value <= 5):
                raise ValueError(f"rating {key}={value!r}; expected an integer from 1 to 5")
        # what people type can hold e-mail addresses, phone and card numbers: stored redacted, like the data
        prompt, output_a, output_b = (pii.redact(t)[0] for t in (prompt, output_a, output_b))
        with closing(self._connect()) as con, con:
            cur = con.execute(
                "INSERT INTO votes (created_utc, prompt, model_a, model_b, output_a, output_b, settings, vote,"
                " coherence_a, relevance_a, coherence_b, relevance_b,"
                " auto_coherence_a, auto_relevance_a, auto_coherence_b, auto_relevance_b)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    prompt,
                    model_a,
                    model_b,
                    output_a,
                    output_b,
                    json.dumps(settings or {}, sort_keys=True),
                    vote,
                    ratings.get("coherence_a"),
                    ratings.get("relevance_a"),
                    ratings.get("coherence_b"),
                    ratings.get("relevance_b"),
                    auto.get("coherence_a"),
                    auto.get("relevance_a"),
                    auto.get("coherence_b"),
                    auto.get("relevance_b"),
                ),
            )
            return int(cur.lastrowid)

    def votes(self) -> list[dict]:
        with closing(self._connect()) as con:
            return [dict(r) for r in con.execute("SELECT * FROM votes ORDER BY id")]

    def purge(self, before: datetime | None = None) -> int:
        """Delete the votes stored before ``before`` (every vote when None) and compact the file,
        so the deleted text does not linger in free pages. Returns how many were deleted."""
        with closing(self._connect()) as con:
            with con:
                if before is None:
                    cur = con.execute("DELETE FROM votes")
                else:  # stored times are UTC ISO-8601 with seconds: they compare as strings
                    cutoff = before.astimezone(timezone.utc).isoformat(timespec="seconds")
                    cur = con.execute("DELETE FROM votes WHERE created_utc < ?", (cutoff,))
            con.execute("VACUUM")
            return cur.rowcount


def parse_date(text: str, name: str = "--before") -> datetime:
    """A date or date-time in ISO format (``2026-12-01``, ``2026-12-01T09:30``); without a zone it is UTC."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{name}={text!r}: expected an ISO date such as 2026-12-01 or 2026-12-01T09:30") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


# --------------------------------------------------------------------------- leaderboard maths


def wilson_interval(wins: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion (ties already counted as half wins)."""
    if n == 0:
        return (0.0, 1.0)
    p = wins / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def win_rates(votes: list[dict]) -> dict[str, dict]:
    """Per model: games (votes it took part in, 'both bad' included), win rate with ties as half,
    and its Wilson 95% interval."""
    stats: dict[str, dict] = {}
    for v in votes:
        for side, model, other in (("A", v["model_a"], "B"), ("B", v["model_b"], "A")):
            s = stats.setdefault(model, {"games": 0, "wins": 0.0})
            s["games"] += 1
            s["wins"] += 1.0 if v["vote"] == side else 0.5 if v["vote"] == "tie" else 0.0
    for s in stats.values():
        s["win_rate"] = s["wins"] / s["games"]
        s["low"], s["high"] = wilson_interval(s["wins"], s["games"])
    return stats


ELO = 400 / math.log(10)  # a logistic coefficient on the Elo scale
ARENA_C = 1.0  # inverse L2 strength of the arena's fits (each vote enters twice, once from each side)


def _bt_logistic(votes: list[dict], names: list[str], length: bool) -> tuple[np.ndarray, float | None]:
    """Bradley-Terry strengths as a logistic regression (one column per model: +1 on A's side, -1 on
    B's; ties as half a win each way; L2 with C = 1, about a virtual game per model, so an unbeaten
    model stays finite), with a column for the normalised length difference
    (len A - len B) / (len A + len B) in words, divided by its standard deviation, when ``length``:
    Chatbot Arena's style control."""
    from sklearn.linear_model import LogisticRegression

    idx = {n: i for i, n in enumerate(names)}
    rows, labels, weights = [], [], []
    for v in votes:
        if v["vote"] == "both_bad":
            continue
        x = np.zeros(len(names) + int(length))
        x[idx[v["model_a"]]], x[idx[v["model_b"]]] = 1.0, -1.0
        if length:
            la, lb = (len(str(v.get(k) or "").split()) for k in ("output_a", "output_b"))
            x[-1] = (la - lb) / (la + lb) if la + lb else 0.0
        won = 1.0 if v["vote"] == "A" else 0.5 if v["vote"] == "tie" else 0.0
        rows += [x, x, -x, -x]  # and the same vote seen from B's side: both classes always present
        labels += [1, 0, 0, 1]
        weights += [won, 1.0 - won, won, 1.0 - won]
    X, y, w = np.array(rows), np.array(labels), np.array(weights)
    if length and X[:, -1].std() > 0:  # standardised, as the arena's style control does
        X[:, -1] = X[:, -1] / X[:, -1].std()
    keep = w > 0
    if not keep.any():
        return np.zeros(len(names)), None
    fit = LogisticRegression(C=ARENA_C, fit_intercept=False, max_iter=1000).fit(X[keep], y[keep], sample_weight=w[keep])
    coef = fit.coef_[0]
    strengths = coef[:len(names)] - coef[:len(names)].mean()
    return strengths, (float(coef[-1]) if length else None)


def arena_ratings(votes: list[dict], n_boot: int = 200, seed: int = 0) -> dict:
    """The leaderboard's ratings on the Elo scale (1000 = the average model): Bradley-Terry as it is,
    and with the replies' length difference as a covariate (style control, as Chatbot Arena does),
    each with a 95% percentile bootstrap interval over votes. ``length_coef`` > 0: the longer reply
    tends to win the vote (per standard deviation of the normalised difference). A linear control: where
    voters pick the longer reply whatever the margin (a step in length), part of it stays with the model
    that writes longer; the evaluation's pairwise reading (``metrics.length_controlled_win_rate``)
    handles that case."""
    names = sorted({v["model_a"] for v in votes} | {v["model_b"] for v in votes})
    if not names:
        return {"models": {}, "length_coef": None}
    raw, _ = _bt_logistic(votes, names, length=False)
    controlled, coef = _bt_logistic(votes, names, length=True)
    rng = np.random.default_rng(seed)
    boots_raw, boots_lc = [], []
    for _ in range(n_boot):
        sample = [votes[i] for i in rng.integers(0, len(votes), len(votes))]
        present = {v["model_a"] for v in sample} | {v["model_b"] for v in sample}
        r, _ = _bt_logistic(sample, names, length=False)
        c, _ = _bt_logistic(sample, names, length=True)
        missing = [i for i, n in enumerate(names) if n not in present]  # a model absent from a resample: no rating
        r[missing], c[missing] = np.nan, np.nan
        boots_raw.append(r)
        boots_lc.append(c)
    br, bc = np.array(boots_raw), np.array(boots_lc)
    ci = lambda b, i: (float(1000 + ELO * np.nanquantile(b[:, i], 0.025)),  # noqa: E731
                       float(1000 + ELO * np.nanquantile(b[:, i], 0.975)))
    return {"models": {n: {"rating": float(1000 + ELO * raw[i]), "interval": ci(br, i),
                           "controlled": float(1000 + ELO * controlled[i]), "controlled_interval": ci(bc, i)}
                       for i, n in enumerate(names)},
            "length_coef": coef, "n": sum(v["vote"] != "both_bad" for v in votes)}


def spearman_interval(x: list[float], y: list[float], n_boot: int = 2000, seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap 95% interval of Spearman's rho over (x, y) pairs."""
    from scipy.stats import spearmanr

    rng = np.random.default_rng(seed)
    xs, ys = np.asarray(x, float), np.asarray(y, float)
    rhos = []
    for _ in range(n_boot):
        idx = rng.integers(0, xs.size, xs.size)
        if np.ptp(xs[idx]) > 0 and np.ptp(ys[idx]) > 0:
            rhos.append(spearmanr(xs[idx], ys[idx])[0])
    if len(rhos) < n_boot // 2:
        return None
    return float(np.quantile(rhos, 0.025)), float(np.quantile(rhos, 0.975))


def agreement(votes: list[dict]) -> dict[str, dict]:
    """Spearman correlation between the judge's and the human 1-5 ratings of the same replies,
    with a 95% bootstrap interval and n (rated sides)."""
    from scipy.stats import spearmanr

    out = {}
    for metric in ("coherence", "relevance"):
        human, auto = [], []
        for v in votes:
            for side in ("a", "b"):
                h, a = v.get(f"{metric}_{side}"), v.get(f"auto_{metric}_{side}")
                if h is not None and a is not None:
                    human.append(h)
                    auto.append(a)
        if len(human) >= 3 and len(set(human)) > 1 and len(set(auto)) > 1:
            rho, pval = spearmanr(human, auto)
            ci = spearman_interval(human, auto)
            out[metric] = {"spearman": float(rho), "p_value": float(pval), "n": len(human),
                           "low": ci[0] if ci else None, "high": ci[1] if ci else None}
        else:
            out[metric] = {"spearman": None, "p_value": None, "n": len(human), "low": None, "high": None}
    return out


def agreement_text(agree: dict[str, dict]) -> str:
    """One line: 'coherence: 0.61 [0.32, 0.80] (n=24); relevance: ...'."""
    parts = []
    for metric, a in agree.items():
        if a["spearman"] is None:
            parts.append(f"{metric}: not enough rated replies (n={a['n']})")
        else:
            rho = (interval_text(a, keys=("spearman", "low", "high")) if a.get("low") is not None
                   else f"{a['spearman']:.2f}")
            parts.append(f"{metric}: {rho} (n={a['n']})")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import os

    parser = argparse.ArgumentParser(prog="python -m utils.ratings")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("purge", help="delete stored votes (prompts, replies, ratings) for good")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--before", help="delete votes stored before this UTC date / date-time (ISO format)")
    which.add_argument("--all", action="store_true", help="delete every vote")
    p.add_argument("--db", default=os.environ.get("LORA_COMPARE_RATINGS_DB", str(DEFAULT_DB)),
                   help="the rating store (default: $LORA_COMPARE_RATINGS_DB or data/ratings.sqlite)")
    args = parser.parse_args(argv)
    try:
        before = None if args.all else parse_date(args.before)
    except ValueError as err:
        parser.error(str(err))
    if not Path(args.db).exists():
        parser.error(f"--db {args.db}: no rating store there (nothing to delete)")
    store = RatingStore(args.db)
    deleted = store.purge(before)
    print(f"{args.db}: deleted {deleted} vote(s); {len(store.votes())} remain")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
