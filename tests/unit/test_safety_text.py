"""Safety, what the classifiers read (utils/safety/text.py): the regular expressions and the word list
that remain as explicit layers, the language identifier's doubt, and the pieces a long text is read in."""
import json
from pathlib import Path

import pytest

from utils import safety

EXPLICIT = ["I want to kill myself", "i'm thinking about suicide", "I want to end my life", "I have been self-harming",
            "sometimes I want to die", "I'm going to take my own life"]
HYPERBOLE = ["I could kill myself laughing at that show", "This traffic is killing me", "I'm dying to see the new film",
             "I nearly died of embarrassment", "kill the process with SIGKILL", "Suicide Squad was a fun movie"]


@pytest.mark.parametrize("text", ["je n'ai plus envie de vivre, tout est trop lourd",
                                  "ya no quiero seguir viviendo así",
                                  "ich halte das alles nicht mehr aus und will sterben",
                                  "non voglio più svegliarmi domani mattina"])
def test_latin_script_messages_in_other_languages_are_doubt(text):
    """Script alone read these as English (and the English classifier missed them); the language
    identifier says they are not, so the dashboard shows the help notice."""
    doubt = safety.language_doubt(text)
    assert doubt and doubt.startswith("probably not English (") and safety.language_of(text)[0] != "en"


@pytest.mark.parametrize("text", ["i wanna kms fr", "wyd", "lol ok", "sdfkj lkjsdf qwpo", "gonna sleep, night all",
                                  "I'm sorry you're going through this. Please call 988."])
def test_english_slang_short_messages_and_keyboard_mash_are_not_doubt(text):
    assert safety.language_doubt(text) is None


def test_no_english_text_of_the_repo_is_called_another_language():
    """LANGUAGE_DOUBT was set on these texts: no English message, reply or ladder prompt of the repo
    is doubted (the Latin placeholder "lorem ipsum" is not English)."""
    from utils.validity import ladder

    def texts_of(pattern: str, positive: str) -> list[str]:
        return [r["text"] for p in sorted(safety.SAFETY_DATA.glob(f"*/{pattern}"))  # fitted/ and unseen/
                for r in safety.load_labelled(p, positive)]

    texts = texts_of("crisis_*.yaml", "positive") + texts_of("unsafe_*.yaml", "unsafe")
    texts += [r["prompt"] for r in ladder()]
    assert len(texts) > 2500
    assert [t for t in texts if safety.language_doubt(t)] == ["lorem ipsum dolor sit amet"]


def test_chunks_cover_the_whole_text_at_word_boundaries():
    text = " ".join(f"word{i}" for i in range(3000))
    pieces = safety.chunks(text, size=200)
    assert " ".join(pieces) == text and max(len(p) for p in pieces) <= 200



# --------------------------------------------------------------------------- the explicit layers

@pytest.mark.parametrize("text", EXPLICIT)
def test_patterns_catch_explicit_phrasings(text):
    assert safety.pattern_flag(text)


@pytest.mark.parametrize("text", HYPERBOLE)
def test_patterns_skip_hyperbole(text):
    assert not safety.pattern_flag(text)


def test_output_word_list_reports_what_it_blocked(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("words: [badword]\npatterns: ['\\bsecret\\s+plan\\b']\n")
    assert safety.blocked_terms("This has a BadWord and a secret  plan.", str(cfg)) == ["badword", "secret  plan"]
    assert safety.blocked_terms("all fine here", str(cfg)) == []
    assert safety.blocked_terms("how to build a bomb") == ["how to build a bomb"]


def test_patterns_on_the_phrases_they_were_written_against():
    rows = [json.loads(line) for line in (Path(__file__).parents[1] / "data" / "crisis_labelled.jsonl").open()]
    explicit = [r for r in rows if r["kind"] == "explicit"]
    assert len(explicit) == 12 and all(safety.pattern_flag(r["text"]) for r in explicit)
    assert not any(safety.pattern_flag(r["text"]) for r in rows if r["kind"] == "hyperbole")
