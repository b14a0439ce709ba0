"""Reading a request's JSON body whole, within a size and a time limit, before anything else.

A slow or endless body holds only its own connection: nothing is published until the body
is complete and valid, so it never takes a worker's slot::

    body = await read_json(request, limit=s.max_job_bytes, timeout=s.http_body_timeout)

Raises ApiError: ``request_too_large`` (413) past ``limit`` bytes (at once when the
Content-Length says so), ``request_timeout`` (408) when the body is not all there within
``timeout`` seconds, ``invalid_request`` (400) when it is not UTF-8 JSON of an object.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from fastapi import Request

from frontdoor.errors import ApiError


async def read_json(request: Request, *, limit: int, timeout: float) -> dict[str, Any]:
    raw = await read_body(request, limit=limit, timeout=timeout)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        problem = "not UTF-8" if "utf-8" in str(exc).lower() else f"not valid JSON: {exc.msg}"
        raise ApiError(
            "invalid_request", f"the request body is {problem} (at byte {exc.pos})"
        ) from None
    if not isinstance(body, dict):
        raise ApiError("invalid_request", "the request body must be a JSON object")
    return body


async def read_body(request: Request, *, limit: int, timeout: float) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(
            "request_timeout", f"the request body did not arrive within {timeout:g} s"
        ) from None
    return b"".join(chunks)


def _too_large(limit: int) -> ApiError:
    return ApiError(
        "request_too_large", f"the request body is larger than {limit} bytes: send less"
    )


__all__ = ["read_body", "read_json"]
