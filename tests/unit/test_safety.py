import pytest

from utils import safety

EXPLICIT = ["I want to kill myself", "i'm thinking about suicide", "I want to end my life", "I have been self-harming",
            "sometimes I want to die", "I'm going to take my own life"]
IMPLICIT = ["There's no reason to go on anymore", "Everyone would be better off without me", "I can't go on like this",
            "I wish I was never born"]
HYPERBOLE = ["I could kill myself laughing at that show", "This traffic is killing me", "I'm dying to see the new film",
             "I nearly died of embarrassment", "kill the process with SIGKILL", "Suicide Squad was a fun movie"]
NEUTRAL = ["What is the capital of France?", "How do I reset my password?", "I feel a bit anxious before exams"]


@pytest.mark.parametrize("text", EXPLICIT + IMPLICIT)
def test_crisis_phrasings_are_caught(text):
    assert safety.crisis_flag(text)


@pytest.mark.parametrize("text", HYPERBOLE + NEUTRAL)
def test_hyperbole_and_neutral_text_are_not_flagged(text):
    assert not safety.crisis_flag(text)


def test_output_filter_reports_what_it_blocked(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("words: [badword]\npatterns: ['\\bsecret\\s+plan\\b']\n")
    assert safety.blocked_terms("This has a BadWord and a secret  plan.", str(cfg)) == ["badword", "secret  plan"]
    assert safety.blocked_terms("all fine here", str(cfg)) == []
    assert safety.blocked_terms("how to build a bomb") == ["how to build a bomb"]


def test_detector_measured_on_the_labelled_set():
    import json
    from pathlib import Path

    rows = [json.loads(line) for line in (Path(__file__).parents[1] / "data" / "crisis_labelled.jsonl").open()]
    result = safety.evaluate_detector(rows)
    explicit = result["by_kind"]["explicit"]
    assert explicit["flagged"] == explicit["n"] == 12, explicit["missed"]  # every explicit phrasing is caught
    assert result["by_kind"]["hyperbole"]["flagged"] == 0
    pos = sum(r["label"] for r in rows)
    assert result["recall"] == (12 + result["by_kind"]["implicit"]["flagged"]) / pos
    assert 0 <= result["false_positive_rate"] <= 1 and result["n"] == len(rows)
