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


# Formats written here, by hand, not drawn from utils.pii (whose own generator cannot test its own regexes):
# each must be found whole, in a sentence, with nothing else redacted.
VARIED = [
    ("Reach me on first.last@sub.example.org if needed.", "first.last@sub.example.org", "EMAIL"),
    ("MAIL: OPS_TEAM@EXAMPLE.COM", "OPS_TEAM@EXAMPLE.COM", "EMAIL"),
    ("cc a-b.c+tag2@mail.example.co.uk, thanks", "a-b.c+tag2@mail.example.co.uk", "EMAIL"),
    ("Ring 020 7946 0018 after six", "020 7946 0018", "PHONE"),
    ("tel +1-212-555-0147 (office)", "+1-212-555-0147", "PHONE"),
    ("call (646) 555 0199, ask for Sam", "(646) 555 0199", "PHONE"),
    ("my mobile is +33 6 12 34 56 78", "+33 6 12 34 56 78", "PHONE"),
    ("it's 312.555.0182 at home", "312.555.0182", "PHONE"),
    ("pay with 3782 822463 10005 please", "3782 822463 10005", "CARD"),
    ("number 6011000990139424 expired", "6011000990139424", "CARD"),
    ("Visa 4012-8888-8888-1881.", "4012-8888-8888-1881", "CARD"),
    ("docs at http://docs.example.net/v2/start#install now", "http://docs.example.net/v2/start#install", "URL"),
    ("see HTTPS://EXAMPLE.COM/Path?q=1&r=2 there", "HTTPS://EXAMPLE.COM/Path?q=1&r=2", "URL"),
    ("gateway 10.20.30.40 is down", "10.20.30.40", "IP"),
    ("the host fe80::1ff:fe23:4567:890a answered", "fe80::1ff:fe23:4567:890a", "IP"),
    ("server 8.8.4.4, then retry", "8.8.4.4", "IP"),
]


@pytest.mark.parametrize("text, secret, label", VARIED)
def test_recall_on_varied_formats_written_here(text, secret, label):
    out, counts = redact(text)
    assert secret not in out and f"<{label}>" in out, out
    assert counts[label] == 1 and sum(counts.values()) == 1, counts
    assert out == text.replace(secret, f"<{label}>")


def test_unassigned_but_phone_shaped_numbers_are_redacted_dates_are_not():
    assert redact("call (293) 723-3769 now")[0] == "call <PHONE> now"
    assert redact("due 2024-01-15 and 15/01/2024")[0] == "due 2024-01-15 and 15/01/2024"
