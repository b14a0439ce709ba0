"""Email addresses: a local part, ``@``, and a domain that ends in a real-looking TLD."""

from __future__ import annotations

import re
from collections.abc import Iterator

KIND = "email"

_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9](?:[A-Za-z0-9._%+-]{0,62}[A-Za-z0-9_%+-])?"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-]|\.\w)"
)


_LOCAL_RUN = re.compile(r"[A-Za-z0-9._%+-]+\Z")
LOCAL_MAX = 64
"""The longest local part the pattern takes."""


def find(text: str) -> Iterator[tuple[int, int]]:
    # The pattern is tried once per "@", at the one place an address can start: where the
    # run of local-part characters before it begins (every later position follows one of
    # them, which the pattern's lookbehind refuses). Tried at every position of a long
    # text, it costs a hundred times more. Same findings as finditer over the whole text.
    end = 0
    at = text.find("@")
    while at != -1:
        run = _LOCAL_RUN.search(text, max(end, at - LOCAL_MAX), at)
        match = None if run is None else _EMAIL.match(text, run.start())
        if match is None:
            at = text.find("@", at + 1)
            continue
        if ".." not in match.group():
            yield match.span()
        end = match.end()
        at = text.find("@", end)
