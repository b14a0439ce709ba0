"""Reading a request's JSON body whole, within a size and a time limit, before anything else,
and only as many bodies at once as the process can hold.

A slow or endless body holds only its own connection: nothing is published until the body
is complete and valid, so it never takes a worker's slot. Routes read it once the key is
proven from the headers (a refused key costs no body read), through the process's
``Bodies``::

    body = await door.bodies.read_request(request, caller)  # a job's request
    body = await door.bodies.read_json(request, caller, limit=REQUEST_BYTES)  # any other

A body sent before any key is proven (a dashboard sign-in form) is read under its client's
address instead (``read_keyless``), and also counted against the process's
``http_keyless_bodies``: addresses are cheap (a /24 of loopback, a trusted proxy's
``X-Forwarded-For``), so only a cap on all of them keeps slow keyless bodies from holding
every connection the process may have, and the keys' requests from being served.

Raises ApiError: ``request_too_large`` (413) past ``limit`` bytes (at once when the
Content-Length says so; for a job's request the message names ``max_job_bytes``, which it
is held to once read, not its body's bound of twice that), ``too_many_requests`` (429)
while the key is sending ``http_bodies_per_key`` bodies already, its team (all its keys
together) its ``http_body_bytes_per_team`` bytes, or the process ``http_keyless_bodies``
keyless ones, ``service_unavailable`` (503) while the process is reading
``http_body_bytes_in_flight`` bytes already (all before any byte is read),
``request_timeout`` (408) when the body is not all there within ``http_body_timeout``
seconds, ``invalid_request`` (400) when it is not UTF-8 JSON of an object. A caller that
hangs up mid-body raises Starlette's ``ClientDisconnect``, answered (to no one) by
``frontdoor.errors``, as on every route that reads a body.

``receive`` is that read, within a size and a time limit, for any body: a batch spooled to a
file (``frontdoor.batches.upload``) reads through it too, and holds one of its key's bodies
meanwhile (``Bodies.reader``), as an uploaded file does.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import functools
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import orjson
from fastapi import Request

from frontdoor.errors import ApiError, error_of
from frontdoor.whose import Keyed, less, sharer, whose
from queuegate.request_limits import body_too_large, too_large
from queuegate.settings import Settings

Reader = Callable[[int], contextlib.AbstractContextManager[None]]
"""``reading(size)``: one body of a caller held while it is read (``Bodies.reader``)."""

RETRY_AFTER = 1.0
"""Seconds a caller refused for bodies in flight is told to wait: most take milliseconds."""
KEYLESS = "client "
"""How a body read before any key is proven is counted: per client address, under this prefix."""


def _too_large(limit: int) -> ApiError:
    # As a request whose job is past the limit is refused, at the front door or in a batch.
    return error_of(too_large(limit))


class Bodies:
    """The request bodies this process is reading: at most ``per_key`` of one API key (or
    client address) at once, at most ``keyless`` sent before any key is proven, at most
    ``total_bytes`` bytes in all and ``team_bytes`` of them one team's (all its keys
    together, ``frontdoor.whose``), as their Content-Length says (the route's limit when it
    says nothing). A team's share keeps the total for the others: one team with several keys
    could otherwise take all of it, and every other team's bodies would be answered 503."""

    def __init__(
        self,
        *,
        timeout: float,
        per_key: int,
        keyless: int,
        total_bytes: int,
        team_bytes: int,
        job_bytes: int,
        body_bytes: int,
    ) -> None:
        """``job_bytes``: the largest request of a job (``max_job_bytes``); ``body_bytes``:
        the largest body read of one (``max_body_bytes``)."""
        self._timeout = timeout
        self._job_bytes = job_bytes
        self._body_bytes = body_bytes
        self._per_key = per_key
        self._keyless_cap = keyless
        self._total_bytes = total_bytes
        self._team_bytes = team_bytes
        self._reading: Counter[str] = Counter()
        self._shares: Counter[str] = Counter()
        """Bytes being read per share (``whose``)."""
        self._keyless = 0
        self._bytes = 0

    @classmethod
    def of(cls, settings: Settings) -> Bodies:
        return cls(
            timeout=settings.http_body_timeout,
            per_key=settings.http_bodies_per_key,
            keyless=settings.keyless_bodies,
            total_bytes=settings.http_body_bytes_in_flight,
            team_bytes=settings.body_bytes_per_team,
            job_bytes=settings.max_job_bytes,
            body_bytes=settings.max_body_bytes,
        )

    async def read_request(self, request: Request, caller: Keyed) -> dict[str, Any]:
        """``read_json`` of a body that makes a job's request: up to ``body_bytes``, past
        which it is refused as a request past the job limit, unread (the limit itself holds
        for the request it makes, ``request_limits.check_job_size``)."""
        reading = self.reader(caller)
        raw = await self._read(request, reading, limit=self._body_bytes, too_large=self._past_job)
        return _json_object(raw)

    def _past_job(self, body_bytes: int) -> ApiError:
        return error_of(body_too_large(self._job_bytes, body_bytes))

    async def read_json(self, request: Request, caller: Keyed, *, limit: int) -> dict[str, Any]:
        return _json_object(await self.read(request, caller, limit=limit))

    async def read(self, request: Request, caller: Keyed, *, limit: int) -> bytes:
        return await self._read(request, self.reader(caller), limit=limit)

    async def _read(
        self,
        request: Request,
        reading: Reader,
        *,
        limit: int,
        too_large: Callable[[int], ApiError] = _too_large,
    ) -> bytes:
        """``too_large``: the refusal past ``limit``."""
        size = declared_size(request, limit, too_large)
        with reading(limit if size is None else size):
            chunks: list[bytes] = []
            await receive(
                request, chunks.append, limit=limit, timeout=self._timeout, too_large=too_large
            )
            return b"".join(chunks)

    async def read_keyless(self, request: Request, client: str, *, limit: int) -> bytes:
        """``read`` of a body sent before any key is proven, held under ``client`` (its
        address) and as one of the process's ``keyless`` bodies: past them, ApiError 429
        before any byte is read. Answered so, the connection is idle again (the rest of its
        body is dropped, ``frontdoor.connections``), the first closed when the process holds
        too many: slow keyless bodies, from however many addresses, keep at most ``keyless``
        of its connections busy."""
        if self._keyless >= self._keyless_cap:
            raise ApiError(
                "too_many_requests",
                "this front-door process is reading as many sign-in forms as it may: retry shortly",
                retry_after_s=RETRY_AFTER,
            )
        self._keyless += 1
        try:
            reading = functools.partial(self.held, f"{KEYLESS}{client}", None)
            return await self._read(request, reading, limit=limit)
        finally:
            self._keyless -= 1

    def reader(self, caller: Keyed) -> Reader:
        """``held`` for ``caller``: every route that reads a body reads it so, an upload its
        own way."""
        return functools.partial(self.held, caller.key_id, whose(caller))

    @contextlib.contextmanager
    def held(self, key_id: str, share: str | None, size: int) -> Iterator[None]:
        """One body of ``key_id`` being read, ``size`` bytes of it held in memory meanwhile
        and counted against ``share`` (none for a keyless body): ApiError 429 or 503 when it
        would be one too many. Every route that reads a body reads it inside this, uploads
        too, so that one key holds at most ``per_key`` of the process's connections with its
        bodies, and one team at most ``team_bytes`` of its bytes, whatever they are."""
        if self._reading[key_id] >= self._per_key:
            sender = "this address" if key_id.startswith(KEYLESS) else "this API key"
            raise ApiError(
                "too_many_requests",
                f"{sender} is sending {self._per_key} request bodies to this process "
                "already: send the next once one has arrived",
                retry_after_s=RETRY_AFTER,
            )
        if share is not None and self._shares[share] + size > self._team_bytes:
            whom, together = sharer(share)
            raise ApiError(
                "too_many_requests",
                f"{whom}'s request bodies being read at this process would be over its "
                f"share of {self._team_bytes} bytes{together}: send the next once one has "
                "arrived",
                retry_after_s=RETRY_AFTER,
            )
        if self._bytes + size > self._total_bytes:
            raise ApiError(
                "service_unavailable",
                "this front-door process is reading as many request bytes as it may: retry shortly",
                retry_after_s=RETRY_AFTER,
            )
        self._reading[key_id] += 1
        self._bytes += size
        if share is not None:
            self._shares[share] += size
        try:
            yield
        finally:
            self._bytes -= size
            less(self._reading, key_id, 1)
            if share is not None:
                less(self._shares, share, size)


def _json_object(raw: bytes) -> dict[str, Any]:
    """``raw`` parsed, a JSON object: else ApiError ``invalid_request``."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if raw.startswith(codecs.BOM_UTF8):  # UTF-8 all the same: orjson's message says "UTF-8"
            raise ApiError(
                "invalid_request",
                "the request body starts with a byte-order mark (EF BB BF): send the JSON "
                "without it",
            ) from None
        problem = "not UTF-8" if "utf-8" in str(exc).lower() else f"not valid JSON: {exc.msg}"
        raise ApiError(
            "invalid_request", f"the request body is {problem} (at byte {exc.pos})"
        ) from None
    if not isinstance(body, dict):
        raise ApiError("invalid_request", "the request body must be a JSON object")
    return body


def declared_size(request: Request, limit: int, too_large: Callable[[int], ApiError]) -> int | None:
    """The body's size as its Content-Length says (None when it says none); ``too_large(limit)``
    raised at once when that is past ``limit``."""
    declared = request.headers.get("content-length")
    if declared is None or not declared.isdigit():
        return None
    if int(declared) > limit:
        raise too_large(limit)
    return int(declared)


async def receive(
    request: Request,
    into: Callable[[bytes], object],
    *,
    limit: int,
    timeout: float,
    too_large: Callable[[int], ApiError] = _too_large,
) -> None:
    """Hand the request's body to ``into`` as it arrives, never more than ``limit`` bytes of
    it (``too_large(limit)`` past them, at once when the Content-Length says so), all within
    ``timeout`` seconds (else ``request_timeout``)."""
    declared_size(request, limit, too_large)
    received = 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit:
                    raise too_large(limit)
                into(chunk)
    except TimeoutError:
        raise ApiError(
            "request_timeout", f"the request body did not arrive within {timeout:g} s"
        ) from None


__all__ = ["Bodies", "Reader", "declared_size", "receive"]
