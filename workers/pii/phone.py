"""Phone numbers: international (+CC …) or North American, written with separators.

A bare run of digits is left alone: it is as often an order number as a phone number.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from workers.pii.base import has_digit

KIND = "phone"

_INTERNATIONAL = re.compile(r"\+(?<![\w+]\+)\d{1,3}(?:[ .-]?\(?\d{1,5}\)?){2,6}(?![\w-]|[.]\d)")
_NANP = re.compile(
    r"(?<![\w-])(?:1[ .-])?(?:\([2-9]\d{2}\) ?|[2-9]\d{2}[ .-])[2-9]\d{2}[ .-]\d{4}(?![\w-]|[.]\d)"
)


def find(text: str) -> Iterator[tuple[int, int]]:
    if not has_digit(text):
        return
    for match in _INTERNATIONAL.finditer(text):
        digits = sum(ch.isdigit() for ch in match.group())
        if 8 <= digits <= 15:
            yield match.span()
    for match in _NANP.finditer(text):
        yield match.span()
