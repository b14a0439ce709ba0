"""The HTTP boundary: one POST to a provider; every failure leaves here as a ProviderError.

aiohttp's exceptions are mapped with messages written here, never their own text, and the
upstream error message kept as detail goes through ``scrub`` (key removed, one short line).
A successful whole answer that echoes the key has it redacted (``echoed``, ``unechoed``)
before anything reads it; a stream event, when its parser reads it (``json_data``).

aiohttp rather than httpx: per call it spends about a fifth of the CPU (``python -m
bench.http_client``), and its pool hands out an idle connection without scanning the others.
"""

from __future__ import annotations

import asyncio
import functools
import re
import ssl
from collections.abc import AsyncGenerator, Callable, Mapping
from contextlib import aclosing
from email.utils import parsedate_to_datetime
from time import time
from types import TracebackType
from typing import Any

import aiohttp
import certifi
import orjson
from aiohttp.http_exceptions import HttpProcessingError
from yarl import URL

from router.providers.base import (
    ProviderError,
    ServerEvent,
    UpstreamRequest,
    classify,
    echoed,
    error_param,
    scrub,
    unechoed,
)

MAX_CONNECTIONS = 1000
"""Per api_base: a worker runs up to about this many calls at once, all kept alive."""
KEEPALIVE_EXPIRY = 30.0
"""Seconds an idle connection is kept; providers close theirs after about a minute."""

_JSON = {"content-type": "application/json"}


class Upstream:
    """The pooled keep-alive connections to one api_base, shared by every call to it::

        async with Upstream("https://api.openai.com") as upstream, upstream.free:
            async with time_limit(30):
                status, body = await post(upstream, request, key)

    Open it inside the event loop that uses it. Proxies and CA bundles come only from what
    it is given (today: none, and certifi's bundle), never from the process environment.
    """

    def __init__(self, api_base: str, *, connections: int = MAX_CONNECTIONS) -> None:
        self._base = api_base.rstrip("/")
        self.free = asyncio.Semaphore(connections)
        """Held by each call from before it is sent until ``done``: calls past the pool's size
        wait here, before aiohttp builds anything for them (waiting in aiohttp's own queue
        holds about 10 KB per call, here about 4 KB), and before their time limits start: a
        call's timeout bounds the provider, never this wait (counted in it, a call that waited
        for a connection timed out while the provider was still answering, and was called
        again)."""
        self._urls: dict[str, URL] = {}
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=connections, keepalive_timeout=KEEPALIVE_EXPIRY, ssl=_tls()
            ),
            # No default bounds: each call sets its connect timeout, and time_limit the rest.
            timeout=aiohttp.ClientTimeout(),
            # Calls are stateless: no cookie of one team's answer rides on another's call.
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )

    async def __aenter__(self) -> Upstream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._session.close()

    async def send(self, request: UpstreamRequest, connect: float | None) -> aiohttp.ClientResponse:
        """The response to ``request`` once its head has arrived, body unread, holding one of
        the connections until ``done``; aiohttp's own errors, unmapped. ``connect`` bounds
        opening a connection: DNS, TCP and TLS. Send it holding ``free``: aiohttp's pool then
        never makes a call wait, and its connect timeout is the connect alone."""
        url = self._urls.get(request.path)
        if url is None:
            # Appended, not joined: an api_base with a path (https://host/openai) keeps it.
            url = self._urls[request.path] = URL(self._base + request.path)
        # orjson's bytes keep a buffer of 4 KiB or more, and aiohttp holds the body until the
        # answer ends: a right-sized copy saves that per call in flight.
        body = bytes(memoryview(orjson.dumps(request.body)))
        return await self._session.post(
            url,
            data=body,
            headers={**_JSON, **request.headers},
            timeout=aiohttp.ClientTimeout(connect=connect),
            allow_redirects=False,
        )

    @staticmethod
    def done(response: aiohttp.ClientResponse) -> None:
        """Give back the connection of a response from ``send``: to the pool when its body
        was read to the end, closed otherwise."""
        response.release()


@functools.cache
def _tls() -> ssl.SSLContext:
    # cafile only: create_default_context would otherwise also read SSL_CERT_FILE/SSL_CERT_DIR.
    return ssl.create_default_context(cafile=certifi.where())


def time_limit(seconds: float) -> TimeLimit:
    """Bound a whole call (connect, send, read; not the wait for ``Upstream.free``): past it,
    ProviderError("timeout"). A stream moves it on as it reads (``TimeLimit.move``)."""
    return TimeLimit(seconds)


STALLED = 0.25
"""Seconds late a call's bound may come due before the worker counts itself as having been
stalled (stopped, or starved of CPU) when it did: its call gets ``STALL_GRACE`` more."""
STALL_GRACE = 0.25
"""Seconds a call whose bound came due during a stall of the worker's may still end: its
answer may have come meanwhile, in the socket unread. Cut at once, such a call (the provider
had served it, 4,100 tokens) was billed at its estimate, a sixteenth of what it cost."""


class TimeLimit:
    # A class, not a generator: a worker holds thousands of calls waiting for a connection,
    # and a generator's context manager keeps its frame, arguments and wrapper (about 700
    # bytes) for as long as the call.
    __slots__ = ("_due", "_graced", "_seconds", "_timeout", "_timer", "_what")

    def __init__(self, seconds: float) -> None:
        self._what = "no answer"
        self._seconds: float | None = seconds
        self._due = 0.0
        """The loop's time the bound comes due, from ``__aenter__`` on."""
        self._graced = False
        self._timer: asyncio.TimerHandle | None = None
        # Ended by ``_due_now`` rather than by its own deadline: that looks at how late the
        # bound came due first.
        self._timeout = asyncio.timeout(None)

    @property
    def expired(self) -> bool:
        """Whether this bound ended the call (not a connect or first-byte timeout within)."""
        return self._timeout.expired()

    def move(self, seconds: float, what: str) -> None:
        """End the call ``seconds`` from now instead, saying ``what`` did not come (a
        stream's next chunk is due)."""
        self._what, self._seconds = what, None
        self._set(asyncio.get_running_loop().time() + seconds)

    def _set(self, due: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        # Due now at the latest: one set in the past is not late by how far in the past.
        self._due = max(due, loop.time())
        self._timer = loop.call_at(self._due, self._due_now)

    def _due_now(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now - self._due > STALLED and not self._graced:
            # Come due during a stall: the answer may be here already, unread.
            self._graced = True
            self._timer = loop.call_at(now + STALL_GRACE, self._due_now)
            return
        self._timer = None
        self._timeout.reschedule(now)

    async def __aenter__(self) -> None:
        await self._timeout.__aenter__()
        # Its seconds as made: only ``move``, once entered, sets them aside.
        assert self._seconds is not None
        self._set(asyncio.get_running_loop().time() + self._seconds)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await _timed_out(
            self._timeout, exc_type, exc, traceback, what=self._what, seconds=self._seconds
        )


async def post(
    upstream: Upstream,
    request: UpstreamRequest,
    secret: str | None,
    *,
    connect: float | None = None,
    first_byte: float | None = None,
) -> tuple[int, Any]:
    """Status and decoded JSON body of a 2xx answer; run it inside ``time_limit``.

    ``secret`` is the key sent with the request, scrubbed from anything the provider echoes,
    answer or error. ``connect`` bounds opening a connection, ``first_byte`` the wait for the
    response headers.
    """
    response = await _opened(upstream, request, secret, connect, _FirstByte(first_byte))
    try:
        with _mapped:
            content = await response.read()
    except ProviderError as err:
        # Cut mid-body after its 2xx head, which comes once the answer is made: the provider
        # did the work, and bills it, so the call is billed as an answer not read
        # (workers.claims). Before, a connection error with no status, it was free.
        raise err.answered(response.status) from err
    finally:
        upstream.done(response)
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError as exc:
        raise ProviderError("bad_response", "the body is not JSON", status=response.status) from exc
    # Looked for in the body as sent, before anything reads it: a provider or a proxy that
    # echoes the key (in the id, the model, the text) would have it relayed, stored and traced.
    if secret is not None and echoed(content, secret, body):
        body = unechoed(body, secret)
    return response.status, body


async def events(
    upstream: Upstream,
    request: UpstreamRequest,
    secret: str | None,
    *,
    connect: float | None = None,
    first_byte: float | None = None,
    on_read: Callable[[], None] | None = None,
) -> AsyncGenerator[ServerEvent, None]:
    """The server-sent events of a 2xx streamed answer; iterate it inside ``time_limit``.

    ``secret`` is scrubbed from the errors as from ``post``'s; from each event, by the
    parser that decodes it (``json_data``): decoded here too, an event echoing it was parsed
    twice. ``first_byte`` bounds the wait for the first event, headers included. ``on_read``
    is called at each read of the body that brought bytes (comments and partial events too:
    the provider is still sending), to move the time limit on.
    """
    limit = _FirstByte(first_byte)
    response = await _opened(upstream, request, secret, connect, limit)
    try:
        async with aclosing(_read_events(response.content, on_read)) as stream:
            async with limit:
                with _mapped:
                    first = await anext(stream, None)
            if first is None:
                return
            yield first
            while True:
                # Not around the yield: what the consumer raises there is not ours to map.
                with _mapped:
                    event = await anext(stream, None)
                if event is None:
                    return
                yield event
    finally:
        upstream.done(response)


async def _read_events(
    body: aiohttp.StreamReader, on_read: Callable[[], None] | None
) -> AsyncGenerator[ServerEvent, None]:
    lines, parser = LineSplitter(), EventParser()
    async for chunk in body.iter_any():
        if on_read is not None:
            on_read()
        for line in lines.feed(chunk):
            if (event := parser.feed(line)) is not None:
                yield event
    for line in lines.end():
        if (event := parser.feed(line)) is not None:
            yield event


class LineSplitter:
    """Bytes in as they arrive, lines out: ended by CRLF, LF or CR, as the SSE spec allows."""

    def __init__(self) -> None:
        self._tail = b""

    def feed(self, chunk: bytes) -> list[str]:
        data = self._tail + chunk
        # A final CR may be the first half of a CRLF split between chunks: it waits.
        cut = len(data) - 1 if data.endswith(b"\r") else len(data)
        head = data[:cut]
        if b"\r" in head:
            head = head.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = head.split(b"\n")
        self._tail = lines.pop() + data[cut:]
        return [line.decode("utf-8", "replace") for line in lines]

    def end(self) -> list[str]:
        """The last line, if the stream ended it with a lone CR (it counts, as a blank line may)."""
        tail, self._tail = self._tail, b""
        return [tail[:-1].decode("utf-8", "replace")] if tail.endswith(b"\r") else []


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


async def _opened(
    upstream: Upstream,
    request: UpstreamRequest,
    secret: str | None,
    connect: float | None,
    first_byte: _FirstByte,
) -> aiohttp.ClientResponse:
    """The response of a 2xx answer, body unread: give it back with ``upstream.done``. An
    error answer raises its ProviderError."""
    async with first_byte:
        with _mapped:
            response = await upstream.send(request, connect)
    if 200 <= response.status < 300:
        return response
    try:
        with _mapped:
            content = await response.read()
    finally:
        upstream.done(response)
    raise _error(response.status, response.headers, content, secret)


class _FirstByte:
    """One first-byte limit, counted from its creation across the steps that share it (the
    response headers, then a stream's first event), so together they never exceed it: each
    ``async with`` bounds one step."""

    __slots__ = ("_seconds", "_timeout", "_when")

    def __init__(self, seconds: float | None) -> None:
        self._seconds = seconds
        self._when = None if seconds is None else asyncio.get_running_loop().time() + seconds
        self._timeout: asyncio.Timeout | None = None

    async def __aenter__(self) -> None:
        self._timeout = asyncio.timeout_at(self._when)
        await self._timeout.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        timeout, self._timeout = self._timeout, None
        assert timeout is not None
        await _timed_out(
            timeout, exc_type, exc, traceback, what="no first byte", seconds=self._seconds
        )


async def _timed_out(
    timeout: asyncio.Timeout,
    exc_type: type[BaseException] | None,
    exc: BaseException | None,
    traceback: TracebackType | None,
    *,
    what: str,
    seconds: float | None,
) -> None:
    """Leave ``timeout``; its expiry (or a TimeoutError from within) as ProviderError("timeout"),
    saying ``what`` came not within ``seconds``."""
    try:
        await timeout.__aexit__(exc_type, exc, traceback)
    except TimeoutError as expired:
        raise _timeout(what, seconds) from expired
    if isinstance(exc, TimeoutError):
        raise _timeout(what, seconds) from exc


def _timeout(what: str, seconds: float | None) -> ProviderError:
    return ProviderError("timeout", what if seconds is None else f"{what} within {seconds:.3g}s")


class _Mapped:
    """aiohttp's errors as ProviderErrors with our own messages (``with _mapped:``).

    A class with one shared instance rather than a generator: no frame held per call.
    """

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is None:
            return
        if isinstance(exc, aiohttp.InvalidURL | ValueError | TypeError):
            # The client refused to build the request: a header it will not send (a key with
            # a line break), a URL it cannot take. Every call would fail alike; never retried
            # here, and its text is left out (it may quote the header or URL).
            raise ProviderError(
                "misconfigured", f"the HTTP client refused the request ({type(exc).__name__})"
            ) from None
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            raise ProviderError("timeout", "no connection within the connect timeout") from exc
        if isinstance(exc, aiohttp.ClientConnectorError):  # refused, DNS, TLS handshake
            raise ProviderError("connection", "cannot connect") from exc
        if isinstance(exc, aiohttp.ClientError | HttpProcessingError):
            # Dropped mid-answer, or bytes that are not HTTP (HttpProcessingError comes
            # through unwrapped from a malformed body).
            raise ProviderError("connection", f"connection lost ({type(exc).__name__})") from exc


_mapped = _Mapped()


def _error(
    status: int, headers: Mapping[str, str], content: bytes, secret: str | None
) -> ProviderError:
    code, message, error = _error_fields(content)
    message = scrub(message, secret)
    return ProviderError(
        classify(status, code, message),
        message,
        status=status,
        retry_after=retry_after(headers),
        param=None if error is None else error_param(error, secret),
    )


def _error_fields(content: bytes) -> tuple[str | None, str, dict[str, Any] | None]:
    """Code, message and error object of an error body: ``{"error": {"message", "code" or
    "type", "param"}}`` for both OpenAI and Anthropic; other servers' bodies are kept as text."""
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        return None, content.decode("utf-8", "replace"), None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        code = error.get("code") or error.get("type")
        return (str(code) if code else None), str(error.get("message") or ""), error
    if isinstance(error, str):
        return None, error, None
    return None, content.decode("utf-8", "replace"), None


def retry_after(headers: Mapping[str, str]) -> float | None:
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
