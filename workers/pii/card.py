"""Payment card numbers: 13-19 digits, a known issuer prefix, and a valid Luhn check digit."""

from __future__ import annotations

import re
from collections.abc import Iterator

from workers.pii.base import has_digit

KIND = "card"

# Digits in one run, or in groups split by one space or dash (4-4-4-4, 4-6-5 for Amex).
_CANDIDATE = re.compile(r"\d(?<![\d.,-]\d)\d{3}(?:[ -]?\d{2,6}){2,4}(?![\d-]|[.,]\d)")
_ISSUER = re.compile(r"^(4|5[1-5]|2[2-7]|3[47]|3[068]|6011|65|64[4-9]|35|62)")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _printed_like_a_card(groups: list[int]) -> bool:
    """One run of digits, groups of four (the last may be shorter), or Amex/Diners 4-6-5/4."""
    if len(groups) == 1:
        return True
    return groups in ([4, 6, 5], [4, 6, 4]) or (
        all(n == 4 for n in groups[:-1]) and 1 <= groups[-1] <= 4
    )


def find(text: str) -> Iterator[tuple[int, int]]:
    if not has_digit(text):
        return
    for match in _CANDIDATE.finditer(text):
        raw = match.group()
        if len({ch for ch in raw if not ch.isdigit()}) > 1:
            continue  # mixed separators: a reference number, not a card
        if not _printed_like_a_card([len(group) for group in re.split(r"[ -]", raw)]):
            continue
        digits = re.sub(r"\D", "", raw)
        if 13 <= len(digits) <= 19 and _ISSUER.match(digits) and luhn_ok(digits):
            yield match.span()
