"""A PDF's pages, counted for its estimate: written plainly, packed in object streams, and
against a deflate bomb."""

from __future__ import annotations

import base64
import random
import zlib
from collections.abc import Callable

import pytest

from queuegate.messages import ChatJob
from workers.admission.estimate import prompt_tokens
from workers.admission.pdf_pages import INFLATED_MAX, MAX_PAGES, PAGE_TOKENS, pdf_pages

PAGE = b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >>"


def _pdf(pages: int, *, packed: bool = False, filler: bytes = b"") -> bytes:
    """A PDF of ``pages`` blank pages: each its own object, or all in one compressed object
    stream (PDF 1.5's way); ``filler``, bytes of a page content stream, compressed."""
    kids = " ".join(f"{3 + i} 0 R" for i in range(pages))
    head = [
        b"1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj",
        f"2 0 obj << /Type /Pages /Kids [{kids}] /Count {pages} >> endobj".encode(),
    ]
    if packed:
        objects = b"\n".join([PAGE] * pages)
        data = zlib.compress(objects)
        head.append(
            f"{3 + pages} 0 obj << /Type /ObjStm /N {pages} /First 0 /Filter /FlateDecode "
            f"/Length {len(data)} >>\nstream\n".encode()
            + data
            + b"\nendstream endobj"
        )
    else:
        head += [f"{3 + i} 0 obj ".encode() + PAGE + b" endobj" for i in range(pages)]
    if filler:
        data = zlib.compress(filler)
        head.append(b"99 0 obj << /Length %d /Filter /FlateDecode >>\nstream\n" % len(data))
        head.append(data + b"\nendstream endobj")
    return b"%PDF-1.7\n" + b"\n".join(head) + b"\ntrailer << /Root 1 0 R >>\n%%EOF\n"


def _url(pdf: bytes) -> str:
    return "data:application/pdf;base64," + base64.b64encode(pdf).decode()


@pytest.mark.parametrize("packed", [False, True], ids=["objects", "object stream"])
def test_a_pdfs_pages_are_counted_however_its_objects_are_written(packed: bool) -> None:
    assert pdf_pages(_url(_pdf(100, packed=packed))) == 100


@pytest.mark.parametrize(
    "url",
    ["data:application/pdf;base64,!!!", "data:image/png;base64,AAAA"],
    ids=["not base64", "not a PDF"],
)
def test_what_holds_no_pdf_is_no_count(url: str) -> None:
    assert pdf_pages(url) is None


def _up(data: bytes, columns: int) -> bytes:
    """``data`` under PNG's Up predictor, rows of ``columns`` bytes (as a PDF writer does)."""
    rows = [data[i : i + columns].ljust(columns, b" ") for i in range(0, len(data), columns)]
    above = bytes(columns)
    out = b""
    for row in rows:
        out += b"\x02" + bytes((a - b) & 255 for a, b in zip(row, above, strict=True))
        above = row
    return out


@pytest.mark.parametrize(
    "hide",
    [
        lambda pdf: pdf.replace(b"/Type /Page ", b"/Type/P#61ge "),
        lambda pdf: pdf.replace(b"/Type /Page ", b"/Type %a comment\n/Page "),
        lambda pdf: pdf.replace(b"/Type /Page ", b"/T#79pe\r\n/Page "),
    ],
    ids=["name escaped", "comment between", "both"],
)
def test_a_page_written_any_way_pdf_allows_is_counted(hide: Callable[[bytes], bytes]) -> None:
    # Before: 100 pages so written were counted as none (estimated by their bytes, 1%)
    assert pdf_pages(_url(hide(_pdf(100)))) == 100


def test_pages_in_an_object_stream_under_a_png_predictor_are_counted() -> None:
    # Given 100 pages in an object stream under PNG's Up predictor, 4 columns (before: none
    # counted, 100 pages estimated at 122 tokens)
    objects = b"\n".join([PAGE] * 100)
    data = zlib.compress(_up(objects, 4))
    pdf = (
        b"%PDF-1.7\n1 0 obj << /Type /ObjStm /N 100 /First 0 /Filter /FlateDecode "
        b"/DecodeParms << /Predictor 12 /Columns 4 >> >>\nstream\n"
        + data
        + b"\nendstream endobj\n%%EOF"
    )
    assert pdf_pages(_url(pdf)) == 100


def test_an_object_streams_bytes_are_inflated_as_they_are_whatever_they_hold() -> None:
    # Given an object stream stored (deflate level 0), its bytes holding "#41" and "%": read
    # as a name's escape or a comment, they would no longer inflate
    objects = b"\n".join([PAGE] * 5) + b" (#41%42) "
    data = zlib.compress(objects, 0)
    pdf = (
        b"%PDF-1.7\n1 0 obj << /Type /ObjStm /N 5 /First 0 /Filter /FlateDecode >>\nstream\n"
        + data
        + b"\nendstream endobj\n%%EOF"
    )
    # (stored, its pages are read in the file too: counted twice, more, never fewer)
    assert 5 <= (pdf_pages(_url(pdf)) or 0) < MAX_PAGES


@pytest.mark.parametrize(
    "pdf",
    [
        b"%PDF-1.7\n%%EOF",
        b"%PDF-1.7\n1 0 obj << /Type /ObjStm /Filter /LZWDecode >>\nstream\nxyz\nendstream",
        b"%PDF-1.7\n1 0 obj << /Type /ObjStm /Filter /FlateDecode >>\nstream\nnot deflate",
        PAGE + b"\n1 0 obj << /Type /ObjStm /Filter /FlateDecode /DecodeParms "
        b"<< /Predictor 2 >> >>\nstream\n" + zlib.compress(PAGE),
    ],
    ids=["no page", "another filter", "encrypted or broken", "a TIFF predictor"],
)
def test_a_pdf_whose_pages_may_hide_is_counted_at_the_most_a_provider_reads(pdf: bytes) -> None:
    assert pdf_pages(_url(pdf)) == MAX_PAGES


def test_a_deflate_bomb_is_inflated_no_further_than_the_bound() -> None:
    # Given an object stream that inflates to 16 MB of page objects, from 16 KB
    bomb = zlib.compress(PAGE * (16 * 2**20 // len(PAGE)))
    head = b"%PDF-1.7\n1 0 obj << /Type /ObjStm /N 1 /First 0 /Filter /FlateDecode >>\nstream\n"
    pdf = head + bomb + b"\nendstream"
    # Expect no more counted than INFLATED_MAX bytes of it hold
    assert pdf_pages(_url(pdf)) == pytest.approx(INFLATED_MAX / len(PAGE), abs=1)


def _job(pdf: bytes) -> ChatJob:
    part = {"type": "file", "file": {"filename": "a.pdf", "file_data": _url(pdf)}}
    content = [{"type": "text", "text": "summarise it"}, part]
    return ChatJob(
        job_id="j",
        team="alpha",
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": content}],
    )


def test_a_pdf_of_blank_pages_is_estimated_at_its_pages_not_its_bytes() -> None:
    # Given a 10 KB PDF of 100 blank pages, which the providers bill 160,000 tokens (before:
    # estimated at 3,400 by its bytes, a team could pass its limits fiftyfold)
    pdf = _pdf(100)
    assert len(pdf) < 10_000
    # Expect it estimated at the most 100 pages cost
    assert prompt_tokens(_job(pdf)) >= 100 * PAGE_TOKENS


def test_a_large_pdf_of_a_few_pages_is_estimated_at_its_pages_not_its_bytes() -> None:
    # Given a 600 KB PDF of 5 pages (scans, say), billed at most 5 pages (before: estimated at
    # 200,000 tokens by its bytes, refused for a team with a tpm of 100,000)
    pdf = _pdf(5, packed=True, filler=random.Random(7).randbytes(600_000))
    assert len(pdf) > 600_000
    # Expect it estimated at 5 pages
    assert 5 * PAGE_TOKENS <= prompt_tokens(_job(pdf)) < 5 * PAGE_TOKENS + 100
