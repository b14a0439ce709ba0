"""Text from outside written out for a terminal or a log line, without rich: a worker
imports the CLI, which uses this at start, and rich (54 modules, 1.7 MB resident) never."""

from __future__ import annotations

import re

CLIPPED = 64
"""Characters a log line or an error repeats at most of a value a client chose (a job id,
a key id, a parameter's name): a line never grows with what was sent."""


PATH_CLIPPED = 255
"""Characters of a file path an error repeats at most: a path as an operator keeps files is
shown whole (a file's own name is at most 255 bytes), one of thousands is not."""


def clipped_path(path: object) -> str:
    """A file path (``Path`` or text) as an error repeats it."""
    return clipped(str(path), PATH_CLIPPED)


def clipped(text: str, limit: int = CLIPPED) -> str:
    """``text``'s first characters, as many as take ``limit`` once their control characters
    are written out (``visible``: ``\\x0a`` takes 4), ``…`` after them when it has more (so
    that a reader knows it was cut). Left raw, for the line that shows it to write out: a
    value of newlines or escape sequences grows no longer there than one of letters."""
    if _CONTROL.search(text, 0, limit + 1) is None:
        return text if len(text) <= limit else f"{text[:limit]}…"
    width = 0
    for end, char in enumerate(text):
        width += len(_escape_char(char)) if _CONTROL.match(char) else 1
        if width > limit:
            return f"{text[:end]}…"
    return text


_CONTROL = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)
"""C0 and C1 controls (ESC, BEL, ...), DEL, the line and paragraph separators (Unicode-aware
readers break lines at them), and the marks and overrides that reorder text."""


def visible(text: str) -> str:
    """``text`` with its control characters written out (``\\x1b``, ``\\u202e``).

    Model names, job ids, metadata and error details come from whoever published a job: raw,
    an escape sequence in one would colour an operator's terminal, set its title or rewrite
    what the table shows.
    """
    # Every character _CONTROL matches is one isprintable refuses, and it reads a usual line
    # faster than the search: a 140-character ASCII log line, by timeit here, 0.9 us for all
    # of visible(), 1.5 us for _CONTROL.search alone (and 13 us for the str.translate of five
    # line breaks that TextFormatter ran before).
    return text if text.isprintable() else _CONTROL.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    return _escape_char(match.group())


_SHORT = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}
"""The escapes Python writes for these, which read more plainly than ``\\x0a``."""


def _escape_char(char: str) -> str:
    if char in _SHORT:
        return _SHORT[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def echoed(text: str) -> str:
    """``text``, a value someone chose, as a line printed straight to a terminal repeats it:
    clipped, its control characters written out (a newline in it cannot break the line, an
    escape sequence cannot colour or clear the screen): ``CLIPPED`` characters and ``…`` at
    most."""
    return visible(clipped(text))
