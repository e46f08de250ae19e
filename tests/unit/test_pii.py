from collections import Counter

import pytest

from utils.pii import redact


@pytest.mark.parametrize(
    "text, label",
    [
        ("write to jane.doe+news@example.co.uk today", "EMAIL"),
        ("see https://example.org/a?b=c for more", "URL"),
        ("or www.example.com/page", "URL"),
        ("the server is 192.168.1.20, ping it", "IP"),
        ("ipv6 2001:db8::8a2e:370:7334 too", "IP"),
        ("my card is 4111 1111 1111 1111 ok", "CARD"),
        ("card 5500-0000-0000-0004", "CARD"),
        ("call me at (415) 555-2671 tomorrow", "PHONE"),
        ("call +44 20 7946 0958 please", "PHONE"),
        ("or 415.555.2671", "PHONE"),
    ],
)
def test_each_type_is_redacted(text, label):
    out, counts = redact(text)
    assert f"<{label}>" in out
    assert counts[label] == 1
    assert sum(counts.values()) == 1, counts


@pytest.mark.parametrize(
    "text",
    [
        "I was born in 1987 and have 3 cats.",
        "Version 1.2.3 fixed it.",
        "The order number is 1234567890123 (fails Luhn).",
        "Meet at 10:30 on 2024-01-15.",
        "Pi is about 3.14159.",
    ],
)
def test_ordinary_numbers_survive(text):
    out, counts = redact(text)
    assert out == text
    assert not counts


def test_counts_accumulate_and_url_wins_over_email_inside_it():
    counts = Counter()
    redact("mail a@b.io", counts)
    out, counts = redact("https://x.org/?to=a@b.io and 10.0.0.1", counts)
    assert out == "<URL> and <IP>"
    assert counts == Counter({"EMAIL": 1, "URL": 1, "IP": 1})


def test_python_slices_are_not_ipv6():
    code = "return s == s[::-1] and t[::2]"
    assert redact(code)[0] == code


@pytest.mark.parametrize("seed", [0, 7])
def test_recall_on_seeded_varied_formats(seed):
    from utils.pii import measure_recall

    result = measure_recall(n=30, seed=seed)
    assert set(result) == {"CARD", "EMAIL", "IP", "PHONE", "URL"}
    for label, r in result.items():
        assert r["n"] == 30
        assert r["recall"] == 1.0, (label, r["missed"])


def test_unassigned_but_phone_shaped_numbers_are_redacted_dates_are_not():
    assert redact("call (293) 723-3769 now")[0] == "call <PHONE> now"
    assert redact("due 2024-01-15 and 15/01/2024")[0] == "due 2024-01-15 and 15/01/2024"
