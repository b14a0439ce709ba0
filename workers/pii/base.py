"""What a PII detector finds: a span of text and the family it belongs to."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Finding:
    start: int
    end: int
    kind: str


Find = Callable[[str], Iterator[tuple[int, int]]]
"""A detector: the (start, end) spans of its family in a text."""


_DIGIT = re.compile(r"\d")


def has_digit(text: str) -> bool:
    """Whether the text has a digit: detectors of numbers skip the regex when not."""
    return _DIGIT.search(text) is not None
