"""The figures draw the numbers they are given: bar lengths are the means, error bars the intervals,
titles carry n; each is saved as a PNG when given a path."""
import pytest

from utils import plots


def _stat(mean, low, high, n=64):
    return {"mean": mean, "low": low, "high": high, "n": n}


EVALUATION = {
    "summary": {"a (base)": {"overall": _stat(3.0, 2.5, 3.5), "relevance": _stat(4.0, 3.8, 4.2),
                             "coherence": _stat(4.5, 4.4, 4.6), "words": _stat(40.0, 35.0, 45.0)},
                "a (LoRA)": {"overall": _stat(2.0, 1.6, 2.3), "relevance": _stat(2.5, 2.1, 2.9),
                             "coherence": _stat(4.1, 3.9, 4.3), "words": _stat(7.0, 5.0, 9.0)}},
    "by_category": {"a (base)": {"factual": {"overall": _stat(3.2, 3.0, 3.4, 16)},
                                 "support": {"overall": _stat(2.8, 2.5, 3.1, 16)}},
                    "a (LoRA)": {"factual": {"overall": _stat(2.2, 2.0, 2.4, 16)},
                                 "support": {"overall": _stat(None, None, None, 0)}}},
}


def test_quality_bars_are_the_means_with_their_intervals(tmp_path):
    fig = plots.plot_quality(EVALUATION, tmp_path / "q.png")
    assert (tmp_path / "q.png").stat().st_size > 5_000
    for ax, metric in zip(fig.axes, plots.QUALITY):
        assert ax.get_title() == f"{metric} (n=64)"
        widths = [p.get_width() for p in ax.patches]
        assert widths == pytest.approx([EVALUATION["summary"][n][metric]["mean"] for n in EVALUATION["summary"]])
        lines = [c for c in ax.containers if hasattr(c, "lines")][0].lines[2][0].get_segments()
        assert [x for s in lines for x in (s[0][0], s[1][0])] == pytest.approx(
            [EVALUATION["summary"][n][metric][k] for n in EVALUATION["summary"] for k in ("low", "high")])


def test_categories_skip_what_was_not_graded_and_draw_the_rest(tmp_path):
    fig = plots.plot_categories(EVALUATION, "overall", tmp_path / "c.png")
    ax = fig.axes[0]
    widths = sorted(p.get_width() for p in ax.patches if p.get_width() == p.get_width())  # NaN: not graded
    assert widths == pytest.approx([2.2, 2.8, 3.2])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["factual", "support"]
    assert (tmp_path / "c.png").exists()
