"""Reading a large request within a size and a time limit: a multipart upload, or a body
spooled to a file.

The whole request is bounded as it arrives, before anything spools it, so a request past
the limit costs the front door no more than the limit; an uploaded file is bounded again,
exactly, as it is stored. Each is one of the key's bodies read at once (``Bodies.held``):
a key may hold no more of the process's connections with slow uploads than with slow chat
bodies, though an upload has minutes to arrive::

    reading = door.bodies.reader(caller)
    async with read_upload(request, reading, limit=s.batch_file_max_bytes, timeout=60) as form:
        upload, purpose = form.get("file"), form.get("purpose")
    await spool_body(request, reading, path, limit=..., timeout=...)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Request
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.types import Message

from frontdoor.batches.files import OverQuota
from frontdoor.body import Reader, declared_size, receive
from frontdoor.errors import ApiError

FORM_OVERHEAD = 64 * 1024
"""Bytes of a multipart request beside the file: boundaries, part headers, other fields."""
IN_MEMORY = 1024 * 1024
"""Bytes of an upload held in memory at most while it arrives, as the process's bytes in
flight count it: the multipart parser spools a file to disk past a megabyte (Starlette's
``MultiPartParser.spool_max_size``), and a spooled body goes to its file as it comes."""


@asynccontextmanager
async def read_upload(
    request: Request, reading: Reader, *, limit: int, timeout: float
) -> AsyncIterator[FormData]:
    """The request's form, its files spooled by the parser and closed on exit."""
    bound = limit + FORM_OVERHEAD
    size = declared_size(request, bound, lambda _: too_large(limit))
    received = 0

    async def counted() -> Message:
        nonlocal received
        message = await request.receive()
        received += len(message.get("body", b""))
        if received > bound:
            raise too_large(limit)
        return message

    try:
        with reading(min(bound if size is None else size, IN_MEMORY)):
            async with asyncio.timeout(timeout):
                form = await Request(request.scope, counted).form(max_files=1, max_fields=16)
    except TimeoutError:
        raise ApiError(
            "request_timeout", f"the upload did not arrive within {timeout:g} s"
        ) from None
    except HTTPException as exc:  # the parser's refusal of a malformed form, 400
        raise ApiError(
            "invalid_request",
            f"the upload is not a form this route reads ({exc.detail.rstrip('.')}): send one "
            "file as the multipart field `file`, with `purpose`, as the SDKs do",
        ) from None
    try:
        yield form
    finally:
        await form.close()


async def spool_body(
    request: Request, reading: Reader, path: Path, *, limit: int, timeout: float
) -> None:
    """Write the request's body to ``path``, never more than ``limit`` bytes of it."""
    size = declared_size(request, limit, too_large)
    with reading(min(limit if size is None else size, IN_MEMORY)), path.open("wb") as f:
        await receive(request, f.write, limit=limit, timeout=timeout, too_large=too_large)


async def chunks(upload: UploadFile, size: int) -> AsyncIterator[bytes]:
    """An uploaded file's bytes, ``size`` at a time."""
    while chunk := await upload.read(size):
        yield chunk


async def file_chunks(path: Path, size: int) -> AsyncIterator[bytes]:
    """A local file's bytes, ``size`` at a time."""
    with path.open("rb") as f:
        while chunk := f.read(size):
            yield chunk


def too_large(limit: int) -> ApiError:
    return ApiError(
        "request_too_large", f"the upload is over {limit:,} bytes: split it into several batches"
    )


def over_quota(exc: OverQuota) -> ApiError:
    """400, as OpenAI and Anthropic answer a file storage quota exceeded."""
    return ApiError(
        "storage_quota_exceeded",
        f"team {exc.team}'s stored files would be past their quota of {exc.quota:,} bytes "
        f"({exc.used:,} kept now): delete files or ended batches it no longer needs, then "
        "try again",
    )
