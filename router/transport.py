"""The HTTP boundary: one POST to a provider; every failure leaves here as a ProviderError.

httpx exceptions are mapped with messages written here, never their own text, and the
upstream error message kept as detail is scrubbed of the key and cut to one short line.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from email.utils import parsedate_to_datetime
from time import time
from typing import Any

import httpx
import orjson

from router.providers.base import (
    MAX_DETAIL,
    ProviderError,
    ServerEvent,
    UpstreamRequest,
    classify,
)

_JSON = {"content-type": "application/json"}


@asynccontextmanager
async def time_limit(seconds: float) -> AsyncIterator[None]:
    """Bound a whole call (pool wait, connect, send, read): past it, ProviderError("timeout")."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError as exc:
        raise ProviderError("timeout", f"no answer within {seconds:.3g}s") from exc


async def post(
    client: httpx.AsyncClient,
    request: UpstreamRequest,
    secret: str | None,
    *,
    connect: float | None = None,
    first_byte: float | None = None,
) -> tuple[int, Any]:
    """Status and decoded JSON body of a 2xx answer; run it inside ``time_limit``.

    ``secret`` is the key sent with the request, scrubbed from anything the provider echoes.
    ``connect`` bounds opening a connection, ``first_byte`` the wait for the response headers.
    """
    limit = _FirstByte(first_byte)
    async with _opened(client, request, secret, connect, limit) as response, _mapped():
        content = await response.aread()
    try:
        return response.status_code, orjson.loads(content)
    except orjson.JSONDecodeError as exc:
        raise ProviderError(
            "bad_response", "the body is not JSON", status=response.status_code
        ) from exc


async def events(
    client: httpx.AsyncClient,
    request: UpstreamRequest,
    secret: str | None,
    *,
    connect: float | None = None,
    first_byte: float | None = None,
) -> AsyncGenerator[ServerEvent, None]:
    """The server-sent events of a 2xx streamed answer; iterate it inside ``time_limit``.

    ``first_byte`` bounds the wait for the first event, headers included.
    """
    limit = _FirstByte(first_byte)
    async with _opened(client, request, secret, connect, limit) as response:
        lines = response.aiter_lines()
        parser = EventParser()
        first: ServerEvent | None = None
        async with limit.bound(), _mapped():
            async for line in lines:
                if (first := parser.feed(line)) is not None:
                    break
        if first is None:
            return
        yield first
        while True:
            with _mapped_sync():
                try:
                    line = await anext(lines)
                except StopAsyncIteration:
                    break
            if (event := parser.feed(line)) is not None:
                yield event


class EventParser:
    """Lines in, events out, as the SSE spec says: fields until a blank line, comments skipped."""

    def __init__(self) -> None:
        self._name: str | None = None
        self._data: list[str] = []

    def feed(self, line: str) -> ServerEvent | None:
        if not line:
            if not self._data:
                self._name = None
                return None
            event = ServerEvent(self._name, "\n".join(self._data))
            self._name, self._data = None, []
            return event
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            self._name = value
        elif field == "data":
            self._data.append(value)
        return None


@asynccontextmanager
async def _opened(
    client: httpx.AsyncClient,
    request: UpstreamRequest,
    secret: str | None,
    connect: float | None,
    first_byte: _FirstByte,
) -> AsyncIterator[httpx.Response]:
    """The response of a 2xx answer, body unread; an error answer raises its ProviderError."""
    built = client.build_request(
        "POST",
        request.path,
        content=orjson.dumps(request.body),
        headers={**_JSON, **request.headers},
        # Only the connect phase is bounded here; time_limit bounds the whole call.
        timeout=httpx.Timeout(None, connect=connect),
    )
    async with first_byte.bound(), _mapped():
        response = await client.send(built, stream=True)
    try:
        if not response.is_success:
            async with _mapped():
                await response.aread()
            raise _error(response, secret)
        yield response
    finally:
        await response.aclose()


class _FirstByte:
    """One first-byte limit, counted from its creation across the steps that share it (the
    response headers, then a stream's first event), so together they never exceed it."""

    def __init__(self, seconds: float | None) -> None:
        self._seconds = seconds
        self._when = None if seconds is None else asyncio.get_running_loop().time() + seconds

    @asynccontextmanager
    async def bound(self) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout_at(self._when):
                yield
        except TimeoutError as exc:
            raise ProviderError("timeout", f"no first byte within {self._seconds:.3g}s") from exc


@asynccontextmanager
async def _mapped() -> AsyncIterator[None]:
    with _mapped_sync():
        yield


@contextmanager
def _mapped_sync() -> Iterator[None]:
    """httpx's errors as ProviderErrors with our own messages."""
    try:
        yield
    except httpx.ConnectError as exc:
        raise ProviderError("connection", "cannot connect") from exc
    except httpx.ConnectTimeout as exc:
        raise ProviderError("timeout", "no connection within the connect timeout") from exc
    except httpx.DecodingError as exc:
        raise ProviderError("bad_response", "the body cannot be decoded") from exc
    except httpx.TransportError as exc:
        raise ProviderError("connection", f"connection lost ({type(exc).__name__})") from exc


def _error(response: httpx.Response, secret: str | None) -> ProviderError:
    code, message = _error_fields(response)
    if secret:
        message = message.replace(secret, "[redacted]")
    message = " ".join(message.split())[:MAX_DETAIL]
    return ProviderError(
        classify(response.status_code, code, message),
        message,
        status=response.status_code,
        retry_after=retry_after(response.headers),
    )


def _error_fields(response: httpx.Response) -> tuple[str | None, str]:
    """Code and message of an error body: ``{"error": {"message", "code" or "type"}}`` for both
    OpenAI and Anthropic; other servers' bodies are kept as text."""
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return None, response.text
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        code = error.get("code") or error.get("type")
        return (str(code) if code else None), str(error.get("message") or "")
    if isinstance(error, str):
        return None, error
    return None, response.text


def retry_after(headers: httpx.Headers) -> float | None:
    """Seconds to wait, from ``retry-after-ms`` (OpenAI), ``retry-after`` (seconds or an HTTP
    date), or else OpenAI's ``x-ratelimit-reset-*`` (the exhausted limit's, if one says 0)."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is not None:
        try:
            return max(0.0, float(value))
        except ValueError:
            pass
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time())
        except (TypeError, ValueError):
            pass
    resets = {
        kind: seconds
        for kind in ("requests", "tokens")
        if (seconds := _duration(headers.get(f"x-ratelimit-reset-{kind}"))) is not None
    }
    exhausted = [
        s for kind, s in resets.items() if headers.get(f"x-ratelimit-remaining-{kind}") == "0"
    ]
    if exhausted:
        return max(exhausted)
    return min(resets.values(), default=None)


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _duration(value: str | None) -> float | None:
    """OpenAI's reset durations: ``20ms``, ``1s``, ``6m0s``, ``1h2m3.5s``."""
    if not value:
        return None
    parts = _DURATION_PART.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value.strip():
        return None
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
