"""A PDF's pages, counted for its estimate: the providers bill a PDF by its pages (each as
its text and as an image of the page), which its bytes do not show either way. A 10 KB PDF
of 100 blank pages was billed 160,000 tokens; a 600 KB PDF of ten pages, about 30,000, was
estimated at 200,000 by its bytes, more than a team with a tpm of 100,000 takes at once.

No PDF library: counting is all that is needed, and regular expressions over the file and
its object streams do it in about 10 ms for the largest PDF a job can carry
(``QUEUEGATE_MAX_JOB_BYTES``), 25 ms for one made to cost the most. A page is an object of
``/Type /Page``: written as such in the file (its names' ``#`` escapes read, comments
skipped), or in a compressed object stream (``/Type /ObjStm``, PDF 1.5 on), which is
inflated (and its PNG predictor undone), within bounds, to be read. A PDF whose object
streams cannot all be read so (another filter, another predictor, encrypted, past the
bounds), or in which no page is found, is counted at ``MAX_PAGES``, the most a provider
reads: its pages could hide there.
"""

from __future__ import annotations

import binascii
import re
import zlib

from queuegate.provider_formats import PDF, data_url

PAGE_TOKENS = 4_600
"""What a PDF page is estimated at: the most a page costs, its text (Anthropic counts 1,500-
3,000 tokens for a page of text, by its density) and its image (about 1,600 tokens at the
most, a blank page's cost)."""
MAX_PAGES = 100
"""The most pages of a PDF the providers read (Anthropic's and OpenAI's limit): what a PDF is
counted at whose pages may hide from the count. Before, a page written ``/P#61ge``, behind a
comment, or in an object stream with a predictor went uncounted: 100 pages were 122 tokens."""
INFLATED_MAX = 8 << 20
"""Bytes of object streams a PDF's count inflates at most: a deflate bomb costs its job no
more than this (an object stream holds objects' dictionaries, tens of kilobytes a file)."""
PREDICTED_MAX = 64 << 10
"""Bytes of object streams a PDF's count undoes a PNG predictor of at most (byte by byte, in
Python: 200 KB took 48 ms)."""
INFLATE_PIECE = 16 << 10
"""Bytes of a stream given to zlib at a time."""
DICTIONARY_MAX = 1024
"""Bytes looked through around an object stream's type for its dictionary and its data."""
OBJECT_STREAMS_MAX = 256
"""Object streams a PDF's count looks into at most (a PDF a job carries holds tens, each of
up to a few hundred objects): 30,000 that each began a deflate stream held a worker 0.8 s."""

_COMMENT = re.compile(rb"%[^\r\n]*")
_NAME_ESCAPE = re.compile(rb"#([0-9A-Fa-f]{2})")
_PAGE = re.compile(rb"/Type\s*/Page(?![A-Za-z0-9_])")
"""A page object's type (``/Pages``, the tree's inner nodes, is not)."""
_OBJECT_STREAM = re.compile(rb"/Type\s*/ObjStm(?![A-Za-z0-9_])")
_STREAM = re.compile(rb"(?<!end)stream\r?\n")
_OBJECT = re.compile(rb"\d+\s+\d+\s+obj\b")
_FILTER = re.compile(rb"/Filter\s*(\[[^\]]*\]|/[A-Za-z0-9]+)")
_PREDICTOR = re.compile(rb"/Predictor\s*(\d+)")
_COLUMNS = re.compile(rb"/Columns\s*(\d+)")
_ONE_BYTE = (re.compile(rb"/Colors\s*(\d+)"), re.compile(rb"/BitsPerComponent\s*(\d+)"))
MARKS_MAX = 20_000
"""Comments (``%``) or name escapes (``#``) a PDF's count reads through at most: a PDF of the
largest size a job carries holds some 3,000 of each by chance in its compressed streams;
250,000 escapes held a worker 250 ms. Past it, the PDF is counted at ``MAX_PAGES``."""
STREAMS_MAX = 2_000
"""Streams whose dictionaries a PDF's count reads at most, to find its object streams (one
of 100 pages holds some 500): 10,000 took 110 ms."""


class _Unread(Exception):
    """An object stream the count cannot read."""


def pdf_pages(url: str) -> int | None:
    """The pages of the PDF a ``data:application/pdf;base64,...`` URL holds, ``MAX_PAGES`` at
    least when they may hide from the count; None for any other URL, and for data that is
    not base64 (no provider reads it)."""
    given = data_url(url)
    if given is None or given[0] != PDF:
        return None
    try:
        pdf = binascii.a2b_base64(given[1])
    except binascii.Error:
        return None
    if not pdf:
        return None
    if pdf.count(b"%") > MARKS_MAX or pdf.count(b"#") > MARKS_MAX:
        return MAX_PAGES
    text = _readable(pdf)
    pages = len(_PAGE.findall(text))
    budget = [INFLATED_MAX, PREDICTED_MAX]
    unread = False
    found = 0
    for number, data in enumerate(_STREAM.finditer(pdf)):
        if number == STREAMS_MAX:
            unread = True
            break
        dictionary = _dictionary(pdf, data.start())
        if not _OBJECT_STREAM.search(dictionary):
            continue
        found += 1
        if found > OBJECT_STREAMS_MAX:
            unread = True
            break
        try:
            pages += len(_PAGE.findall(_objects(pdf, data.end(), dictionary, budget)))
        except _Unread:
            unread = True
    # An object stream's type written where no stream's dictionary holds it: unread.
    if unread or not pages or len(_OBJECT_STREAM.findall(text)) > found:
        return max(pages, MAX_PAGES)
    return pages


def _readable(text: bytes) -> bytes:
    """``text`` as its names read: comments dropped, ``#xx`` escapes (PDF 1.2 on) read. Of
    the file's text and its dictionaries only: a stream's bytes so changed would not inflate."""
    text = _COMMENT.sub(b"", text)
    if b"#" not in text:
        return text
    return _NAME_ESCAPE.sub(lambda pair: bytes.fromhex(pair[1].decode()), text)


def _dictionary(pdf: bytes, stream: int) -> bytes:
    """The dictionary of the stream whose keyword is at ``stream``: from its object's header,
    as its names read (``_readable``)."""
    head = pdf[max(0, stream - DICTIONARY_MAX) : stream]
    headers = list(_OBJECT.finditer(head))
    return _readable(head[headers[-1].end() :] if headers else head)


def _objects(pdf: bytes, start: int, dictionary: bytes, budget: list[int]) -> bytes:
    """The objects of the object stream whose data begins at ``start``, as the count reads
    them; ``budget``: the bytes left to inflate, and to undo a predictor of. _Unread when
    they cannot be read so."""
    named = _FILTER.search(dictionary)
    if named is None:
        return b""  # not compressed: its objects were counted with the file's
    if named[1].strip(b"[] \r\n\t") != b"/FlateDecode" or budget[0] <= 0:
        raise _Unread
    try:
        objects = _inflated(memoryview(pdf)[start:], budget[0])
    except zlib.error:
        raise _Unread from None
    budget[0] -= len(objects)
    predictor = _PREDICTOR.search(dictionary)
    if predictor is None or int(predictor[1]) == 1:
        return objects
    one_byte = all(
        found is None or int(found[1]) == one
        for found, one in zip((p.search(dictionary) for p in _ONE_BYTE), (1, 8), strict=True)
    )
    if int(predictor[1]) < 10 or not one_byte or len(objects) > budget[1]:
        raise _Unread
    budget[1] -= len(objects)
    columns = _COLUMNS.search(dictionary)
    return _unpredicted(objects, int(columns[1]) if columns else 1)


def _unpredicted(data: bytes, columns: int) -> bytes:
    """``data`` with its PNG predictor undone, rows of ``columns`` bytes each (one byte a
    pixel: one colour of 8 bits, an object stream's). _Unread for a row of no PNG filter."""
    if columns < 1:
        raise _Unread
    width = columns + 1
    above = bytes(columns)
    rows: list[bytes] = []
    for start in range(0, len(data) - width + 1, width):
        kind, raw = data[start], data[start + 1 : start + width]
        row = bytearray(raw)
        if kind == 1:  # Sub
            for i in range(1, columns):
                row[i] = (row[i] + row[i - 1]) & 255
        elif kind == 2:  # Up
            row = bytearray((a + b) & 255 for a, b in zip(raw, above, strict=True))
        elif kind == 3:  # Average
            for i in range(columns):
                left = row[i - 1] if i else 0
                row[i] = (row[i] + (left + above[i]) // 2) & 255
        elif kind == 4:  # Paeth
            for i in range(columns):
                left, up_left = (row[i - 1], above[i - 1]) if i else (0, 0)
                row[i] = (row[i] + _paeth(left, above[i], up_left)) & 255
        elif kind != 0:
            raise _Unread
        rows.append(bytes(row))
        above = rows[-1]
    return b"".join(rows)


def _paeth(left: int, up: int, up_left: int) -> int:
    estimate = left + up - up_left
    near = (abs(estimate - left), abs(estimate - up), abs(estimate - up_left))
    return (left, up, up_left)[near.index(min(near))]


def _inflated(data: memoryview, most: int) -> bytes:
    """The deflate stream ``data`` begins with, inflated to its own end (no search for its
    ``endstream``) or to ``most`` bytes. Fed a piece at a time: zlib given the rest of the
    file at once took time by its length, failing or not (21 ms for 256 tries)."""
    inflate = zlib.decompressobj()
    pieces: list[bytes] = []
    for start in range(0, len(data), INFLATE_PIECE):
        piece = inflate.decompress(data[start : start + INFLATE_PIECE], most)
        pieces.append(piece)
        most -= len(piece)
        if inflate.eof or most <= 0:
            break
    return b"".join(pieces)
