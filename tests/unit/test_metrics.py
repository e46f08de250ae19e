"""Metric functions against hand-computed values, and the statistics."""

import numpy as np
import pytest

from utils import metrics


def test_scale_maps_and_clips():
    assert metrics.scale(0.05, 0.05, 0.55) == 1
    assert metrics.scale(0.30, 0.05, 0.55) == 3
    assert metrics.scale(0.55, 0.05, 0.55) == 5
    assert metrics.scale(-1, 0.05, 0.55) == 1 and metrics.scale(2, 0.05, 0.55) == 5


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
