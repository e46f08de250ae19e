"""The default corpus (``embedded:supportive-chat``): its shape, its data card, and no leak into any
evaluation set (a near-copy planted in a copy of it is found and removed by the data preparation)."""
import json
import shutil
from collections import Counter

import pytest

from utils import cards, data
from utils.paths import CHATTERBOT_CORPUS, DEFAULT_CORPUS, SUPPORTIVE_CORPUS, SUPPORTIVE_CORPUS_DIR
from utils.suite import EXAMPLE_PROMPTS, FIRST_PROMPT, load_domain_suite


@pytest.fixture(scope="module")
def corpus():
    return data.read_inputs(data.resolve_inputs(SUPPORTIVE_CORPUS))


def test_default_corpus_is_the_projects_own():
    assert DEFAULT_CORPUS == SUPPORTIVE_CORPUS == data.PrepareConfig.input_path
    assert [f.stem for f in data.resolve_inputs(SUPPORTIVE_CORPUS)] == sorted(
        {p["category"] for p in load_domain_suite()})


def test_unknown_embedded_name_is_refused_with_the_known_ones():
    with pytest.raises(data.DataError, match="embedded:supportive-chat.*embedded:chatterbot-corpus"):
        data.resolve_inputs("embedded:no-such-corpus")


def test_corpus_shape(corpus):
    """At least 600 conversations, a quarter multi-turn, user first and turns alternating, each file's
    rows of its own category, replies mostly 30-120 words, no opening that most replies share."""
    assert len(corpus) >= 600
    assert sum(sum(m["role"] == "user" for m in c.messages) >= 2 for c in corpus) >= len(corpus) / 4
    ids = []
    for conv in corpus:
        roles = [m["role"] for m in conv.messages]
        assert roles == ["user", "assistant"] * (len(roles) // 2), (conv.file, conv.line)
        row = json.loads(open(conv.file, encoding="utf-8").read().splitlines()[conv.line - 1])
        assert row["category"] == conv.source
        ids.append(row["id"])
    assert len(ids) == len(set(ids))
    words = [len(m["content"].split()) for c in corpus for m in c.messages if m["role"] == "assistant"]
    assert sum(30 <= w <= 120 for w in words) / len(words) >= 0.8
    openings = Counter(" ".join(m["content"].split()[:2]).lower() for c in corpus for m in c.messages
                       if m["role"] == "assistant")
    assert openings.most_common(1)[0][1] <= 0.03 * len(words)


def test_data_card_states_the_corpus_as_it_is(corpus):
    """CARD.md's table is the one computed from the files (regenerate it with cards.corpus_table)."""
    card = (SUPPORTIVE_CORPUS_DIR / "CARD.md").read_text(encoding="utf-8")
    assert cards.corpus_table(data.corpus_profile(corpus)) in card
    assert "Licence" in card or "License" in card


def test_no_corpus_turn_is_a_near_copy_of_an_evaluation_text(corpus):
    assert data.evaluation_leaks(corpus) == []


def test_dashboard_examples_are_not_in_the_corpus(corpus):
    seen = {data.near_key(m["content"]) for c in corpus for m in c.messages}
    assert not seen & {data.near_key(p) for p in EXAMPLE_PROMPTS.values()}
    assert FIRST_PROMPT in EXAMPLE_PROMPTS.values()


def test_planted_near_copy_is_found_and_removed(tmp_path):
    """A domain-suite prompt with its case and punctuation changed, planted as the second user turn of a
    copy of the corpus, and a safety-set message as a first turn: both found, both conversations removed
    by the data preparation and named in its data card."""
    folder = tmp_path / "corpus"
    shutil.copytree(SUPPORTIVE_CORPUS_DIR, folder)
    suite_prompt = load_domain_suite()[5]["prompt"]
    planted = suite_prompt.upper().replace("?", "").replace(".", "") + "!!"
    advice = folder / "everyday_advice.jsonl"
    rows = [json.loads(line) for line in advice.read_text(encoding="utf-8").splitlines()]
    rows[3]["messages"] += [{"role": "user", "content": planted}, {"role": "assistant", "content": "A reply."}]
    rows[7]["messages"][0]["content"] = "  i've been feeling ANXIOUS lately and i don't really know why  "
    advice.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    leaks = data.evaluation_leaks(data.read_inputs(data.resolve_inputs(folder)))
    assert [(x["line"], x["turn"], x["role"]) for x in leaks] == [(4, 2, "user"), (8, 0, "user")]
    assert leaks[0]["evaluation_file"] == "eval/domain_suite.yaml" and leaks[0]["evaluation_text"] == suite_prompt

    card = data.prepare(folder, tmp_path / "processed")
    assert [(x["line"], x["role"]) for x in card["evaluation_leaks_removed"]] == [(4, "user"), (8, "user")]
    assert card["counts"]["total"] == len(data.read_inputs(data.resolve_inputs(SUPPORTIVE_CORPUS))) - 2
    kept = {data.near_key(m["content"]) for s in ("train", "validation", "test")
            for r in data.read_jsonl(tmp_path / "processed" / f"{s}.jsonl") for m in r["messages"]}
    assert data.near_key(suite_prompt) not in kept
    assert "near-copy of an evaluation text" in (tmp_path / "processed" / "data_card.md").read_text()


def test_chatterbot_stays_a_named_option():
    """The old default is one name away, and its own leak into the domain suite is removed when prepared."""
    convs = data.read_inputs(data.resolve_inputs(CHATTERBOT_CORPUS), on_error="skip")
    assert len(convs) > 1500
    leaked = {x["text"] for x in data.evaluation_leaks(convs)}
    assert "What is the largest planet in our solar system?" in leaked
