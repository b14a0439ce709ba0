"""US Social Security numbers, written AAA-GG-SSSS, without the ranges never issued."""

from __future__ import annotations

import re
from collections.abc import Iterator

from workers.pii.base import has_digit

KIND = "ssn"

_SSN = re.compile(r"(\d(?<![\w-]\d)\d\d)([- ])(\d{2})\2(\d{4})(?![\w-])")
_ADVERTISED = {"078-05-1120", "219-09-9999"}
"""Numbers printed on sample cards and in ads, never a person's."""


def valid(area: str, group: str, serial: str) -> bool:
    return (
        area not in ("000", "666")
        and not area.startswith("9")
        and group != "00"
        and serial != "0000"
        and f"{area}-{group}-{serial}" not in _ADVERTISED
    )


def find(text: str) -> Iterator[tuple[int, int]]:
    if not has_digit(text):
        return
    for match in _SSN.finditer(text):
        if valid(match.group(1), match.group(3), match.group(4)):
            yield match.span()
