"""A bound on the headers a process reads of a message, before they are decoded.

pamqp decodes a message's header table in Python, on the event loop that serves every team,
and its cost grows faster than its size (it slices the rest of the frame at each value): a
table of small integers took 0.9 ms at 2 KB, 5.7 ms at 16 KB (the ``frame_max`` the README
asks of the broker) and 88 ms at 80 KB (a broker left at RabbitMQ's 131072). A team publishing
such messages, jobs or control requests, with its own credentials, took the worker from every
other team (their p50 5 -> 383 ms at 20 a second). The gateway's own headers take some 6 KiB
at most (README, Header bytes).

``bound_headers()`` has every frame read after it checked first: a message whose header table
is larger than ``HEADERS_MAX`` bytes is read with the table replaced, undecoded, by one of a
single header, ``HEADERS_DROPPED``, its size: what reads the message refuses it saying so.
A check costs a few byte reads a frame; each header read is marked with its size
(``header_bytes``).
"""

from __future__ import annotations

from collections.abc import Mapping

import pamqp.frame
from pamqp.encode import field_table
from pamqp.frame import FrameTypes
from pamqp.header import ContentHeader

from queuegate.errors import InvalidRequest

HEADERS_MAX = 8192
"""Bytes of a message's header table a process decodes at most (about 3 ms of CPU)."""
HEADERS_DROPPED = "x-queuegate-headers-dropped"
"""The header that stands for a table larger than ``HEADERS_MAX``: its size in bytes."""

_FRAME_HEADER = 2  # pamqp.constants.FRAME_HEADER: a message's properties
_PROPERTIES = 7 + 12  # frame type, channel, size; class, weight, body size
_CONTENT_TYPE, _CONTENT_ENCODING, _HEADERS = 0x8000, 0x4000, 0x2000
_BYTES = "queuegate_bytes"
_decode = pamqp.frame.unmarshal


def bound_headers() -> None:
    """Bound the headers of every message this process reads (idempotent)."""
    pamqp.frame.unmarshal = _bounded


def check_headers_read(headers: Mapping[str, object]) -> None:
    """InvalidRequest for a message whose header table was dropped (``HEADERS_DROPPED``, or
    a header a sender put under that name itself): what reads a job or a control request
    refuses it so, before anything reads its headers (an API key's proof is among them)."""
    dropped = headers.get(HEADERS_DROPPED)
    if dropped is None:
        return
    size = f"{dropped:,} bytes" if isinstance(dropped, int) else "too large"
    raise InvalidRequest(
        f"the message's headers are {size}, more than the {HEADERS_MAX:,} bytes the gateway "
        "reads: send fewer or smaller headers (a job's request goes in its body)"
    )


def header_bytes(header: ContentHeader) -> int:
    """The bytes of a message's properties as read (its header table cut to
    ``HEADERS_MAX``), for what charges a team by what its messages cost to read."""
    return int(getattr(header, _BYTES, 0))


def _bounded(data_in: bytes) -> tuple[int, int, FrameTypes]:
    if data_in[0] != _FRAME_HEADER:
        return _decode(data_in)
    read = _without_large_table(data_in) if len(data_in) > _PROPERTIES + HEADERS_MAX else data_in
    _, channel, header = _decode(read)
    setattr(header, _BYTES, len(read))
    return len(data_in), channel, header  # the bytes read are the frame's as sent


def _without_large_table(frame: bytes) -> bytes:
    """``frame`` (a whole content header frame) with a header table larger than
    ``HEADERS_MAX`` replaced by one of ``HEADERS_DROPPED``; as it was otherwise, or when it
    is malformed (pamqp says so then)."""
    at = _PROPERTIES
    flags = int.from_bytes(frame[at : at + 2])
    while int.from_bytes(frame[at : at + 2]) & 1:  # another word of flags follows
        at += 2
    at += 2
    for flag in (_CONTENT_TYPE, _CONTENT_ENCODING):
        if flags & flag:
            at += 1 + frame[at] if at < len(frame) else 0
    if not flags & _HEADERS or at + 4 > len(frame):
        return frame
    size = int.from_bytes(frame[at : at + 4])
    if size <= HEADERS_MAX or at + 4 + size > len(frame) - 1:
        return frame
    kept = field_table({HEADERS_DROPPED: size})
    rest = frame[at + 4 + size :]
    payload = len(frame) - 8 - 4 - size + len(kept)
    return frame[:3] + payload.to_bytes(4) + frame[7:at] + kept + rest
