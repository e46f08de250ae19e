"""PII redaction: e-mail addresses, URLs, IP addresses, card numbers and phone numbers
become typed placeholders (``<EMAIL>``, ``<URL>``, ``<IP>``, ``<CARD>``, ``<PHONE>``).

Regular expressions cover the shapes with a clear grammar (e-mail, URL, IP); card numbers
must also pass the Luhn checksum so that order numbers and the like survive; phone numbers
are found by Google's libphonenumber port (``phonenumbers``), which knows real numbering plans
far better than a hand-written pattern would.
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


def _redact_phones(text: str, counts: Counter) -> str:
    for region in _PHONE_REGIONS:
        matches = list(phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.VALID))
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
