"""The automatic scores order obviously better and worse replies correctly (real offline
models: all-MiniLM-L6-v2 for relevance, SmolLM2-135M as the coherence judge)."""
import random

import pytest

from utils import metrics

pytestmark = pytest.mark.slow

PROMPTS = ["What is artificial intelligence?", "How do I reset my password?",
           "I have been feeling anxious lately.", "What is the capital of France?"]
GOOD = ["Artificial intelligence is the field of computer science that builds machines able to learn and reason.",
        "Open the settings page, choose Security, and click Reset password. You will get an e-mail with a link.",
        "I'm sorry you're feeling this way. Talking to someone you trust or a counsellor can help a lot.",
        "The capital of France is Paris, a city on the river Seine."]
OFF_TOPIC = ["My favourite football team won the match yesterday.", "Bananas are rich in potassium.",
             "The stock market closed higher today.", "I like to play the guitar on weekends."]


def _shuffled(text):
    words = text.split()
    random.Random(0).shuffle(words)
    return " ".join(words)


def _looped(text):
    return " ".join(text.split()[:4] * 8)


@pytest.fixture(scope="module")
def scorer():
    return metrics.Scorer(metrics.Embedder(), metrics.Judge("smollm2-135m"))


def test_on_topic_outscores_off_topic_on_relevance(scorer):
    on = scorer.relevance(PROMPTS, GOOD)
    off = scorer.relevance(PROMPTS, OFF_TOPIC)
    for a, b in zip(on, off):
        assert a > b
    assert all(1 <= x <= 5 for x in on + off)


@pytest.mark.parametrize("damage", [_shuffled, _looped], ids=["shuffled", "looped"])
def test_fluent_outscores_damaged_on_coherence(scorer, damage):
    for prompt, good in zip(PROMPTS, GOOD):
        fluent = scorer.coherence_parts(prompt, good)["coherence"]
        broken = scorer.coherence_parts(prompt, damage(good))["coherence"]
        assert fluent > broken + 0.3, (prompt, fluent, broken)


def test_empty_reply_scores_lowest(scorer):
    row = scorer.score(["Hi?"], [""], ["Hello!"])[0]
    assert row["coherence"] == 1 and row["relevance"] == 1 and row["words"] == 0
