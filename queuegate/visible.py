"""Text from outside written out for a terminal or a log line, without rich: a worker
imports the CLI, which uses this at start, and rich (54 modules, 1.7 MB resident) never."""

from __future__ import annotations

import re

CLIPPED = 64
"""Characters a log line or an error repeats at most of a value a client chose (a job id,
a key id, a parameter's name): a line never grows with what was sent."""


def clipped(text: str, limit: int = CLIPPED) -> str:
    """``text``'s first ``limit`` characters, ``…`` after them when it has more (so that a
    reader knows it was cut)."""
    return text if len(text) <= limit else f"{text[:limit]}…"


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
"""C0 and C1 controls (ESC, BEL, ...), DEL, and the marks and overrides that reorder text."""


def visible(text: str) -> str:
    """``text`` with its control characters written out (``\\x1b``, ``\\u202e``).

    Model names, job ids, metadata and error details come from whoever published a job: raw,
    an escape sequence in one would colour an operator's terminal, set its title or rewrite
    what the table shows.
    """
    return _CONTROL.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
