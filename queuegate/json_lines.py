"""JSON Lines as the gateway writes them: batch results and errors, skipped lines, JSON logs.

JSON leaves U+2028, U+2029 and NEL (U+0085) raw, and a reader that takes every Unicode line
break for the end of a line (Python's ``str.splitlines``, JavaScript's line terminators)
would cut a line at one, in a ``custom_id`` or a model's text: they are written as the
escapes JSON reads back as the same characters (``\\u2028``)::

    f.write(json_line(result_line))     # the line and its newline, as bytes
"""

from __future__ import annotations

from typing import Any

import orjson

_BREAKS = ((b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"), (b"\xc2\x85", b"\\u0085"))
"""Each one's UTF-8 bytes and its escape. Replaced as bytes: no other character's UTF-8 holds
these sequences, and a line of non-ASCII text is escaped in microseconds, where translating it
as text took a third of a millisecond."""


def one_line(value: Any) -> bytes:
    """``value`` as JSON with no character a reader may take for a line break."""
    text = orjson.dumps(value)
    for raw, escaped in _BREAKS:
        text = text.replace(raw, escaped)
    return text


def json_line(value: Any) -> bytes:
    """``value`` as one line of a JSON Lines file, its newline included."""
    return one_line(value) + b"\n"


__all__ = ["json_line", "one_line"]
