"""PII redaction: e-mail addresses, URLs, IP addresses, card numbers and phone numbers
become typed placeholders (``<EMAIL>``, ``<URL>``, ``<IP>``, ``<CARD>``, ``<PHONE>``).

Regular expressions cover the shapes with a clear grammar (e-mail, URL, IP); card numbers
must also pass the Luhn checksum so that order numbers and the like survive; phone numbers
are found by Google's libphonenumber port (``phonenumbers``), which knows real numbering plans
far better than a hand-written pattern would; a number not assigned in any plan is still redacted
when it is written like a phone number (10+ digits with a leading + or separators, not a date).

``python -m utils.pii`` measures recall per type on a seeded set of varied formats.
"""
from __future__ import annotations

import ipaddress
import re
from collections import Counter

import phonenumbers

PLACEHOLDERS = ("URL", "EMAIL", "IP", "CARD", "PHONE")

_URL = re.compile(r"\b(?:https?://|ftp://|www\.)[^\s<>\"']+", re.IGNORECASE)
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.]*\d)")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_CARD = re.compile(r"(?<!\d)\d(?:[ -]?\d){12,18}(?!\d)")
# Regions tried in turn for numbers written without a country code.
_PHONE_REGIONS = ("US", "GB")


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _valid_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _valid_ipv6(text: str) -> bool:
    # at least two hex groups, so that "::" or "::-1" in code (slices) is not an address
    return sum(1 for g in text.split(":") if g) >= 2 and _valid_ip(text)


def _sub(pattern: re.Pattern, label: str, text: str, counts: Counter, check=None) -> str:
    def repl(match: re.Match) -> str:
        if check is not None and not check(match.group(0)):
            return match.group(0)
        counts[label] += 1
        return f"<{label}>"

    return pattern.sub(repl, text)


_DATE = re.compile(r"^\d{4}[-/.]\d{1,2}[-/.]\d{1,2}$|^\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}$")


def _phone_like(match) -> bool:
    """A valid number in its numbering plan, or one written the way phone numbers are (10+ digits
    with a leading + or separators, not a date) even if no such number is assigned."""
    if phonenumbers.is_valid_number(match.number):
        return True
    raw = match.raw_string.strip()
    digits = sum(ch.isdigit() for ch in raw)
    written_as_phone = raw.startswith("+") or bool(re.search(r"[\s().-]", raw))
    return digits >= 10 and written_as_phone and not _DATE.match(raw)


def _redact_phones(text: str, counts: Counter) -> str:
    for region in _PHONE_REGIONS:
        matches = [m for m in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.POSSIBLE)
                   if _phone_like(m)]
        for m in reversed(matches):  # right to left keeps earlier offsets valid
            text = text[: m.start] + "<PHONE>" + text[m.end :]
            counts["PHONE"] += 1
    return text


def redact(text: str, counts: Counter | None = None) -> tuple[str, Counter]:
    """Return ``text`` with PII replaced by placeholders and a Counter of replacements by type.

    Pass ``counts`` to accumulate into an existing Counter."""
    counts = Counter() if counts is None else counts
    text = _sub(_URL, "URL", text, counts)
    text = _sub(_EMAIL, "EMAIL", text, counts)
    text = _sub(_IPV4, "IP", text, counts, check=_valid_ip)
    text = _sub(_IPV6, "IP", text, counts, check=_valid_ipv6)
    text = _sub(_CARD, "CARD", text, counts, check=lambda s: _luhn_ok(re.sub(r"\D", "", s)))
    if any(ch.isdigit() for ch in text):
        text = _redact_phones(text, counts)
    return text, counts


def seeded_examples(n: int = 25, seed: int = 0) -> list[tuple[str, str, str]]:
    """(sentence, secret, type) triples in varied real-world formats, for measuring recall."""
    import random

    rng = random.Random(seed)

    def digits(k):
        return "".join(rng.choice("0123456789") for _ in range(k))

    def luhn_complete(prefix: str, length: int) -> str:
        body = prefix + digits(length - len(prefix) - 1)
        for check in "0123456789":
            if _luhn_ok(body + check):
                return body + check
        raise AssertionError("unreachable")

    def us_number():
        return f"{rng.choice('23456789')}{digits(2)}", f"{rng.choice('23456789')}{digits(2)}", digits(4)

    names = ["jane.doe", "j.smith+news", "Bob_Miller", "anna-lee", "x9"]
    domains = ["example.com", "mail.example.co.uk", "uni.edu", "EXAMPLE.ORG", "sub.domain.io"]
    out = []
    for _ in range(n):
        out.append(("e-mail", f"{rng.choice(names)}{rng.randrange(100)}@{rng.choice(domains)}", "EMAIL"))
        area, ex, line = us_number()
        phone = rng.choice([f"({area}) {ex}-{line}", f"{area}-{ex}-{line}", f"{area}.{ex}.{line}",
                            f"+1 {area} {ex} {line}", f"+44 20 {digits(4)} {digits(4)}", f"+1-{area}-{ex}-{line}"])
        out.append(("phone", phone, "PHONE"))
        out.append(
            (
                "url",
                rng.choice(["https://", "http://", "www."]) + f"site{rng.randrange(999)}.com/path?id={digits(3)}",
                "URL",
            )
        )
        out.append(("ip", rng.choice([".".join(str(rng.randrange(256)) for _ in range(4)),
                                      f"2001:db8:{rng.randrange(65535):x}::{rng.randrange(65535):x}"]), "IP"))
        card = rng.choice([luhn_complete("4", 16), luhn_complete("51", 16), luhn_complete("37", 15)])
        groups = (
            [card[i : i + 4] for i in range(0, len(card), 4)] if len(card) == 16 else [card[:4], card[4:10], card[10:]]
        )
        out.append(("card", rng.choice([" ", "-", ""]).join(groups), "CARD"))
    templates = ["Please contact me at {} if anything changes.", "My {kind} is {} by the way.", "{} — that's the one.",
                 "You can reach it here: {}."]
    return [
        (rng.choice(templates).replace("{kind}", kind).format(secret), secret, label) for kind, secret, label in out
    ]


def measure_recall(n: int = 25, seed: int = 0) -> dict:
    """Share of seeded secrets that ``redact`` removes and labels with the right placeholder, per type."""
    hits: Counter = Counter()
    totals: Counter = Counter()
    misses: dict[str, list[str]] = {}
    for sentence, secret, label in seeded_examples(n, seed):
        totals[label] += 1
        text, _ = redact(sentence)
        if secret not in text and f"<{label}>" in text:
            hits[label] += 1
        else:
            misses.setdefault(label, []).append(sentence)
    return {label: {"recall": hits[label] / totals[label], "n": totals[label], "missed": misses.get(label, [])}
            for label in sorted(totals)}


if __name__ == "__main__":
    import json

    print(json.dumps(measure_recall(), indent=2))
