"""IPv4 and IPv6 addresses, each candidate checked by the standard library's parser."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator

from workers.pii.base import has_digit

KIND = "ip"

_V4 = re.compile(r"\d(?<![\w.]\d)\d{0,2}\.(?:\d{1,3}\.){2}\d{1,3}(?![\w]|\.\d)")
_V6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}"
    r"(?:[0-9A-Fa-f]{0,4}|(?:\d{1,3}\.){3}\d{1,3})(?![\w:])"  # an IPv4 tail: ::ffff:1.2.3.4
)

_V6_COLONS = re.compile(r":[0-9A-Fa-f]{0,4}:")
"""Every IPv6 address has two colons this close: a fast search (it opens with a literal)
that spares the full pattern most texts."""


def find(text: str) -> Iterator[tuple[int, int]]:
    if not has_digit(text):
        return
    for match in _V4.finditer(text):
        try:
            ipaddress.IPv4Address(match.group())
        except ValueError:
            continue
        yield match.span()
    if _V6_COLONS.search(text) is None:
        return
    for match in _V6.finditer(text):
        candidate = match.group()
        if sum(ch.isalnum() for ch in candidate) < 2:
            continue
        try:
            ipaddress.IPv6Address(candidate)
        except ValueError:
            continue
        yield match.span()
