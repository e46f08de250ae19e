import json
import re
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from utils import data
from utils.data import Conversation, DataError
from utils.paths import CHATTERBOT_CORPUS


def _pairs(n, prefix="q"):
    return [{"prompt": f"{prefix} question number {i}?", "response": f"answer {i}."} for i in range(n)]


def _read(files, **kw):
    return data.read_inputs([Path(f) for f in files], **kw)


# --------------------------------------------------------------------------- schemas


def test_every_schema_is_read_into_canonical_messages(write_jsonl, tmp_path):
    files = [
        write_jsonl("pr.jsonl", [{"prompt": "Hi there", "response": "Hello!"}]),
        write_jsonl("counsel.jsonl", [{"Context": "I feel anxious.", "Response": "That sounds hard."}]),
        write_jsonl("alpaca.jsonl", [{"instruction": "Translate", "input": "chat", "output": "cat"},
                                     {"instruction": "Say hi", "input": "", "output": "hi"}]),
        write_jsonl("openai.jsonl", [{"messages": [{"role": "system", "content": "Be brief."},
                                                   {"role": "user", "content": "One?"},
                                                   {"role": "assistant", "content": "1"},
                                                   {"role": "user", "content": "Two?"},
                                                   {"role": "assistant", "content": "2"}]}]),
        write_jsonl("sharegpt.jsonl", [{"conversations": [{"from": "human", "value": "A?"},
                                                          {"from": "gpt", "value": "B."},
                                                          {"from": "human", "value": "C?"},
                                                          {"from": "gpt", "value": "D."}]}]),
    ]
    report = data.ReadReport()
    convs = _read(files, report=report)
    assert [report.schemas[str(f)] for f in files] == [
        "prompt_response",
        "context_response",
        "alpaca",
        "openai",
        "sharegpt",
    ]
    by_source = {}
    for c in convs:
        by_source.setdefault(c.source, []).append(c.messages)
    assert by_source["pr"] == [[{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]]
    assert by_source["counsel"][0][0] == {"role": "user", "content": "I feel anxious."}
    assert by_source["alpaca"][0][0]["content"] == "Translate\n\nchat"
    assert by_source["alpaca"][1][0]["content"] == "Say hi"
    assert [m["role"] for m in by_source["openai"][0]] == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in by_source["sharegpt"][0]] == ["A?", "B.", "C?", "D."]


def test_schema_can_be_forced(write_jsonl):
    f = write_jsonl("x.jsonl", [{"prompt": "p", "response": "r", "instruction": "i", "output": "o"}])
    assert _read([f], schema="alpaca")[0].messages[0]["content"] == "i"
    with pytest.raises(DataError, match="schema='nope'"):
        _read([f], schema="nope")


def test_chatterbot_yaml_with_line_numbers(tmp_path):
    f = tmp_path / "greet.yml"
    f.write_text("categories:\n- greetings\nconversations:\n- - Hello\n  - Hi\n- - How are you?\n  - Fine.\n"
                 "  - Good to hear\n- just a string\n", encoding="utf-8")
    report = data.ReadReport()
    convs = _read([f], on_error="skip", report=report)
    assert [c.line for c in convs] == [4, 6]
    assert convs[0].source == "chatterbot/greet"
    # the unanswered third turn is dropped
    assert [m["role"] for m in convs[1].messages] == ["user", "assistant"]
    assert report.skipped == [{"file": str(f), "line": 9, "reason": "conversation must be a list of strings"}]


def test_chatterbot_corpus_resolves_to_installed_yaml_files():
    files = data.resolve_inputs(CHATTERBOT_CORPUS)
    assert len(files) >= 15 and all(f.suffix == ".yml" for f in files)
    assert any(f.stem == "tech_support" for f in files)


# --------------------------------------------------------------------------- bad input


BAD_LINES = [
    ('{"prompt": "a", "response": ', "invalid JSON"),
    ('["prompt", "response"]', "not an object"),
    ('{"prompt": "a", "response": "b"} {"prompt": "c", "response": "d"}', "several JSON values on one line"),
    ('{"prompt": "a"}', "missing required field 'response'"),
    ('{"prompt": "a", "response": "   "}', "required field 'response' is empty"),
    ('{"prompt": "a", "response": ["b"]}', "field 'response' is a list; expected a string"),
    (b'{"prompt": "caf\xe9", "response": "b"}', "not valid UTF-8"),
]


@pytest.mark.parametrize("bad, expected", BAD_LINES)
def test_bad_row_names_file_line_and_expectation(write_jsonl, bad, expected):
    f = write_jsonl("bad.jsonl", _pairs(2) + [bad] + _pairs(1, "z"))
    with pytest.raises(DataError) as err:
        _read([f])
    msg = str(err.value)
    assert msg.startswith(f"{f}:3: ")
    assert expected in msg
    assert "expected" in msg or "required" in msg
    assert err.value.line == 3 and err.value.path == str(f)


@pytest.mark.parametrize("bad, expected", BAD_LINES)
def test_skip_mode_lists_bad_rows(write_jsonl, bad, expected):
    f = write_jsonl("bad.jsonl", _pairs(2) + [bad] + _pairs(1, "z"))
    report = data.ReadReport()
    convs = _read([f], on_error="skip", report=report)
    assert len(convs) == 3
    assert len(report.skipped) == 1
    assert report.skipped[0]["line"] == 3 and expected in report.skipped[0]["reason"]


def test_unknown_schema_lists_the_known_ones(write_jsonl):
    f = write_jsonl("odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(
        DataError, match=r"odd.jsonl:1: unknown schema: keys \['answer', 'question'\]; expected one of: prompt_response"
    ):
        _read([f])


def test_rows_must_follow_the_files_schema(write_jsonl):
    f = write_jsonl("mixed.jsonl", [{"prompt": "p", "response": "r"}, {"instruction": "i", "output": "o"}])
    with pytest.raises(DataError, match=r"mixed.jsonl:2: missing required field 'prompt'"):
        _read([f])


def test_bad_roles_and_turn_shapes(write_jsonl):
    f = write_jsonl("roles.jsonl", [{"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]}])
    with pytest.raises(DataError, match=r"roles.jsonl:1: 'messages\[1\].role' is 'tool'; expected one of"):
        _read([f])
    g = write_jsonl("turns.jsonl", [{"conversations": [{"from": "human"}]}])
    with pytest.raises(
        DataError, match=r"turns.jsonl:1: 'conversations\[0\]' must be an object with 'from' and 'value'"
    ):
        _read([g])


def test_missing_and_empty_files(tmp_path, write_jsonl):
    with pytest.raises(DataError, match=r"nothere.jsonl: file not found; expected a JSONL file"):
        _read([tmp_path / "nothere.jsonl"])
    empty = write_jsonl("empty.jsonl", [])
    with pytest.raises(DataError, match=r"empty.jsonl: file is empty; expected one JSON object per line"):
        _read([empty])
    blank = write_jsonl("blank.jsonl", ["", "   "])
    with pytest.raises(DataError, match="file is empty"):
        _read([blank])


def test_bad_on_error_value():
    with pytest.raises(DataError, match=r"on_error='ignore'; expected one of \['raise', 'skip'\]"):
        data.read_inputs([], on_error="ignore")


def test_conversation_with_nothing_left_after_cleaning(write_jsonl):
    f = write_jsonl(
        "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\u200b "}]}]
    )
    with pytest.raises(DataError, match=r"c.jsonl:1: no user turn followed by a non-empty assistant reply"):
        _read([f])


def test_file_of_only_duplicates_is_refused(write_jsonl, tmp_path):
    a = write_jsonl("a.jsonl", _pairs(30))
    b = write_jsonl("b.jsonl", [{"prompt": "Q QUESTION number 3", "response": "Answer 3"}])  # near duplicate of a:4
    with pytest.raises(DataError, match=r"b.jsonl: all 1 rows were duplicates"):
        data.prepare([a, b], tmp_path / "out")
    card = data.prepare([a, b], tmp_path / "out", on_error="skip")
    assert card["files_without_new_rows"] == [str(b)]
    assert card["duplicates_removed"]["near"] == 1


def test_fraction_that_empties_a_split(write_jsonl, tmp_path):
    f = write_jsonl("a.jsonl", _pairs(20))
    with pytest.raises(DataError, match=r"test_fraction=0.01 of 20 conversations leaves the test split empty"):
        data.prepare(f, tmp_path / "out", test_fraction=0.01)
    with pytest.raises(DataError, match=r"val_fraction=1.5; expected a number strictly between 0 and 1"):
        data.prepare(f, tmp_path / "out", val_fraction=1.5)
    with pytest.raises(DataError, match=r"val_fraction \+ test_fraction = 1; expected less than 1"):
        data.prepare(f, tmp_path / "out", val_fraction=0.5, test_fraction=0.5)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- cleaning, PII, dedup


def test_normalisation():
    assert data.normalize_text("  Ｈｅｌｌｏ\u200b   world \r\n\r\n\r\n\tnext  ") == "Hello world\n\n    next"
    assert data.normalize_text("def f():\n    return  1") == "def f():\n    return 1"


def test_dedup_exact_and_near_counts():
    def conv(u, a, src="s"):
        return Conversation([{"role": "user", "content": u}, {"role": "assistant", "content": a}], src, "f", 1)

    convs = [conv("Hello there", "Hi!"), conv("Hello there", "Hi!"), conv("hello, THERE", "hi"),
             conv("Hello there", "Something else"), conv("Other", "Hi!", "t")]
    kept, stats = data.deduplicate(convs)
    assert [c.messages[1]["content"] for c in kept] == ["Hi!", "Something else", "Hi!"]
    assert stats["exact"] == 1 and stats["near"] == 1 and stats["by_source"] == {"s": 2}


def test_prepare_redacts_pii_and_counts_it(write_jsonl, tmp_path):
    rows = _pairs(20) + [
        {"prompt": "mail me at bob@example.com", "response": "ok, or call (415) 555-2671"},
        {"prompt": "my card 4111-1111-1111-1111", "response": "never share it; see https://example.org"},
        {"prompt": "server 10.1.2.3 is down", "response": "reboot 10.1.2.4"},
    ]
    f = write_jsonl("pii.jsonl", rows)
    card = data.prepare(f, tmp_path / "out")
    assert card["pii_redactions"] == {"URL": 1, "EMAIL": 1, "IP": 2, "CARD": 1, "PHONE": 1}
    text = "".join((tmp_path / "out" / f"{s}.jsonl").read_text() for s in data.SPLITS)
    for secret in ("bob@example.com", "555-2671", "4111", "10.1.2.3", "example.org"):
        assert secret not in text
    assert text.count("<IP>") == 2


# --------------------------------------------------------------------------- splits


def _synthetic(prompts):
    return [Conversation([{"role": "user", "content": p}, {"role": "assistant", "content": f"r{i}"}], "s", "f", i)
            for i, p in enumerate(prompts)]


@settings(max_examples=60, deadline=None)
@given(prompts=st.lists(st.sampled_from([f"Prompt {i}" for i in range(40)] + ["prompt 1!", "PROMPT  2"]),
                        min_size=30, max_size=120),
       seed=st.integers(0, 2**16), val=st.floats(0.05, 0.3), test=st.floats(0.05, 0.3))
def test_split_is_grouped_disjoint_complete_and_deterministic(prompts, seed, val, test):
    convs = _synthetic(prompts)
    try:
        splits = data.split_conversations(convs, val, test, seed)
    except DataError as err:  # only for inputs with too few distinct prompts or a train split left empty
        assert "distinct prompts" in str(err) or "train split" in str(err)
        # not a splittable input: hypothesis counts it as rejected and fails the test (health check) when
        # most inputs are, so the assertions below run on most of the generated inputs
        assume(False)
    keys = {s: {data.near_key(c.first_user) for c in rows} for s, rows in splits.items()}
    assert not keys["train"] & keys["validation"]
    assert not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]
    assert sorted(c.line for rows in splits.values() for c in rows) == list(range(len(convs)))
    assert all(splits[s] for s in data.SPLITS)
    again = data.split_conversations(_synthetic(prompts), val, test, seed)
    assert {s: [c.line for c in r] for s, r in again.items()} == {s: [c.line for c in r] for s, r in splits.items()}


def test_split_depends_on_seed():
    convs = _synthetic([f"prompt {i}" for i in range(100)])
    a = data.split_conversations(convs, 0.1, 0.1, 1)
    b = data.split_conversations(convs, 0.1, 0.1, 2)
    assert [c.line for c in a["test"]] != [c.line for c in b["test"]]
    assert len(a["test"]) == len(b["test"]) == 10


# --------------------------------------------------------------------------- outputs


def test_prepare_writes_canonical_splits_and_card(write_jsonl, tmp_path):
    f = write_jsonl("a.jsonl", _pairs(50) + _pairs(5))  # 5 exact duplicates
    card = data.prepare(f, tmp_path / "out", seed=3)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(data.OUTPUT_FILES)
    rows = [json.loads(line) for s in data.SPLITS for line in (out / f"{s}.jsonl").read_text().splitlines()]
    assert len(rows) == 50 == card["counts"]["total"]
    assert all(set(r) == {"id", "source", "messages"} for r in rows)
    assert len({r["id"] for r in rows}) == 50
    assert card["duplicates_removed"]["exact"] == 5
    assert card["counts"]["test"] == 5 and card["counts"]["validation"] == 5
    md = (out / "data_card.md").read_text()
    assert "5 exact" in md and "| a.jsonl | prompt_response | 55 | 50 |" in md
    assert (out / "length_distribution.png").stat().st_size > 1000


def test_failed_run_leaves_previous_output_untouched(write_jsonl, tmp_path):
    out = tmp_path / "out"
    data.prepare(write_jsonl("good.jsonl", _pairs(40)), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = write_jsonl("bad.jsonl", _pairs(39) + ["{oops"])
    with pytest.raises(DataError, match="bad.jsonl:40:"):
        data.prepare(bad, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_failure_while_writing_leaves_previous_output(write_jsonl, tmp_path, monkeypatch):
    out = tmp_path / "out"
    data.prepare(write_jsonl("good.jsonl", _pairs(40)), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("utils.plots.plot_length_distribution", boom)
    with pytest.raises(OSError, match="disk full"):
        data.prepare(write_jsonl("other.jsonl", _pairs(60, "x")), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_output_dir_with_foreign_files_is_refused(write_jsonl, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"out: output_dir holds files this step did not write: \['notes.txt'\]"):
        data.prepare(write_jsonl("good.jsonl", _pairs(40)), out)
    assert (out / "notes.txt").read_text() == "mine"


def _independent_key(text: str) -> str:
    """A normalisation written apart from ``data.near_key``: lower case, every run of characters
    that are neither letters nor digits becomes one space."""
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


VARIANTS = ["What is the capital of France?", "what is the capital of france", "WHAT IS THE CAPITAL OF FRANCE?!",
            "  What   is the capital of France ? ", "What is the capital of France..."]


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_the_written_splits_share_no_prompt_under_an_independent_normalisation(write_jsonl, tmp_path, seed):
    animals = ["cat", "dog", "owl", "fox", "eel", "yak", "emu", "bat", "ant", "cow"]
    rows = [{"prompt": f"How long does a {a} sleep in {m}?", "response": f"It depends on the {a}, {m} {i}."}
            for i, (a, m) in enumerate((a, m) for a in animals for m in ("May", "June", "July", "August", "March"))]
    # one question typed five ways, each with its own reply (so de-duplication keeps them all),
    # and once more as the first turn of a longer conversation
    rows += [{"prompt": v, "response": f"Paris (answer {i})."} for i, v in enumerate(VARIANTS)]
    rows += [{"messages": [{"role": "user", "content": "what is the capital of FRANCE"},
                           {"role": "assistant", "content": "Paris."},
                           {"role": "user", "content": "And of Spain?"},
                           {"role": "assistant", "content": "Madrid."}]}]
    files = [write_jsonl("pairs.jsonl", rows[:-1]), write_jsonl("chat.jsonl", rows[-1:])]
    out = tmp_path / "out"
    card = data.prepare(files, out, val_fraction=0.2, test_fraction=0.2, seed=seed)

    firsts = {}
    for split in data.SPLITS:
        for line in (out / f"{split}.jsonl").read_text().splitlines():
            msgs = json.loads(line)["messages"]
            first = next(m["content"] for m in msgs if m["role"] == "user")
            firsts.setdefault(_independent_key(first), []).append(split)
    france = firsts[_independent_key(VARIANTS[0])]
    assert len(france) == len(VARIANTS) + 1, "a variant was dropped or merged"  # all six kept
    assert len(set(france)) == 1, f"one prompt in several splits: {france}"
    leaking = {k: v for k, v in firsts.items() if len(set(v)) > 1}
    assert leaking == {}
    assert sum(card["counts"][s] for s in data.SPLITS) == len(rows)
