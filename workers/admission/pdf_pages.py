"""A PDF's pages, counted for its estimate: the providers bill a PDF by its pages (each as
its text and as an image of the page), which its bytes do not show either way. A 10 KB PDF
of 100 blank pages was billed 160,000 tokens; a 600 KB PDF of ten pages, about 30,000, was
estimated at 200,000 by its bytes, more than a team with a tpm of 100,000 takes at once.

No PDF library: counting is all that is needed, and a regular expression over the file and
its object streams does it in 3 ms for the largest PDF a job can carry
(``QUEUEGATE_MAX_JOB_BYTES``), 5 ms for one made to cost the most. A page is an object of
``/Type /Page``: written as such in the file, or in a compressed object stream
(``/Type /ObjStm``, PDF 1.5 on), which is inflated, within ``INFLATED_MAX`` bytes, to be
read. A page hidden another way (another filter, a page tree whose leaves are written
otherwise) goes uncounted: the README names the gap.
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
INFLATED_MAX = 8 << 20
"""Bytes of object streams a PDF's count inflates at most: a deflate bomb costs its job no
more than this (an object stream holds objects' dictionaries, tens of kilobytes a file)."""

INFLATE_PIECE = 16 << 10
"""Bytes of a stream given to zlib at a time."""

_PAGE = re.compile(rb"/Type\s*/Page(?![A-Za-z0-9_])")
"""A page object's type (``/Pages``, the tree's inner nodes, is not)."""
_OBJECT_STREAM = re.compile(rb"/Type\s*/ObjStm(?![A-Za-z0-9_])")
_STREAM = re.compile(rb"stream\r?\n")
DICTIONARY_MAX = 1024
"""Bytes looked through from an object stream's type to its data: its dictionary's rest."""
OBJECT_STREAMS_MAX = 256
"""Object streams a PDF's count looks into at most (a PDF a job carries holds tens, each of
up to a few hundred objects): 30,000 that each began a deflate stream held a worker 0.8 s."""


def pdf_pages(url: str) -> int | None:
    """The pages of the PDF a ``data:application/pdf;base64,...`` URL holds; None for any other
    URL, for data that is not base64, and for a PDF in which no page was found."""
    given = data_url(url)
    if given is None or given[0] != PDF:
        return None
    try:
        pdf = binascii.a2b_base64(given[1])
    except binascii.Error:
        return None
    pages = len(_PAGE.findall(pdf))
    left = INFLATED_MAX
    view = memoryview(pdf)
    for number, kind in enumerate(_OBJECT_STREAM.finditer(pdf)):
        if number == OBJECT_STREAMS_MAX:
            break
        data = _STREAM.search(pdf, kind.end(), kind.end() + DICTIONARY_MAX)
        if data is None:
            continue
        try:
            objects = _inflated(view[data.end() :], left)
        except zlib.error:
            continue
        pages += len(_PAGE.findall(objects))
        left -= len(objects)
        if left <= 0:
            break
    return pages or None


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
