"""Text from outside written out for a terminal, without rich: a worker imports the CLI,
which uses this at start, and rich (54 modules, 1.7 MB resident) never."""

from __future__ import annotations

import re

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
