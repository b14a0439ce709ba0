"""Email addresses: a local part, ``@``, and a domain that ends in a real-looking TLD."""

from __future__ import annotations

import re
from collections.abc import Iterator

KIND = "email"

_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9](?:[A-Za-z0-9._%+-]{0,62}[A-Za-z0-9_%+-])?"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-]|\.\w)"
)


def find(text: str) -> Iterator[tuple[int, int]]:
    if "@" not in text:  # most prompts: skip the regex, the costly part
        return
    for match in _EMAIL.finditer(text):
        if ".." not in match.group():
            yield match.span()
