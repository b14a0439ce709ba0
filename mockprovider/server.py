"""The mock provider's HTTP/1.1 server: raw asyncio streams, keep-alive, no framework.

Model endpoints: ``POST /v1/chat/completions`` (OpenAI), ``POST /v1/messages`` (Anthropic) and
``POST /vllm/v1/chat/completions`` (a vLLM server).
Control endpoints, for other processes: ``GET /_mock/stats`` (``?log=1`` adds the request
log), ``POST /_mock/config`` (a JSON `MockConfig` replaces the behaviour), ``POST /_mock/reset``.
Request bodies must come with ``Content-Length``; responses are written whole, streams
included (as chunked server-sent events), which keeps the server far faster than its clients.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import random
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from typing import Any, Literal, NamedTuple, Self
from urllib.parse import parse_qs

import orjson
from pydantic import ValidationError

from mockprovider.config import Behavior, MockConfig
from mockprovider.validation import InvalidRequest
from mockprovider.wire import ANTHROPIC, OPENAI, VLLM_PREFIX, VLLM_SERVER, PromptCache, Wire

log = logging.getLogger(__name__)

Header = tuple[str, str]


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One call to a model endpoint as the mock saw it: never the API key, only whether one came."""

    t: float
    """``time.monotonic()`` when the call was answered (or hung up on)."""
    wall: float
    """``time.time()`` at the same moment."""
    path: str
    model: str | None
    status: int | None
    """The HTTP status answered; None when the call was hung up on (timeout injection)."""
    stream: bool
    had_key: bool
    body: dict[str, Any] | None
    """The parsed request; None when it was not a JSON object."""

    @property
    def messages(self) -> Any:
        return None if self.body is None else self.body.get("messages")

    @property
    def system(self) -> Any:
        """Anthropic's top-level system prompt (OpenAI sends it among the messages)."""
        return None if self.body is None else self.body.get("system")


@dataclass(slots=True)
class Stats:
    """Counters of model calls since the last reset, and a log of the most recent ones."""

    log: deque[CallRecord]
    calls: int = 0
    hung: int = 0
    by_model: Counter[str] = field(default_factory=Counter)
    by_status: Counter[int] = field(default_factory=Counter)
    """Answered calls by HTTP status; hung-up calls are counted in ``hung`` only."""

    def to_json(self, *, with_log: bool) -> dict[str, Any]:
        counters: dict[str, Any] = {
            "calls": self.calls,
            "hung": self.hung,
            "by_model": self.by_model,
            "by_status": self.by_status,
        }
        if with_log:
            counters["log"] = list(self.log)
        return counters


Outcome = Literal["answer", "rate_limited", "error", "hang"]


@dataclass(slots=True)
class _Bucket:
    """One model's requests: ``rpm / 60`` a second, up to ``capacity``, on the monotonic clock."""

    rpm: int
    capacity: int
    level: float
    at: float

    def take(self, now: float) -> bool:
        self.level = min(self.capacity, self.level + (now - self.at) * self.rpm / 60)
        self.at = now
        if self.level < 1:
            return False
        self.level -= 1
        return True

    def next_in(self) -> float:
        """Seconds until the bucket admits a call again."""
        return max(0.0, (1 - self.level) * 60 / self.rpm)

    def quota(self, wire: Wire) -> list[Header]:
        """What the provider tells every caller of its limit: left now, full again in."""
        full_in = (self.capacity - self.level) * 60 / self.rpm
        return wire.quota_headers(self.rpm, math.floor(self.level), full_in)


class _Faults:
    """Which fault, if any, each call gets: per-model buckets and counters, seeded draws."""

    def __init__(self, seed: int | None) -> None:
        self._random = random.Random(seed)
        self._calls: Counter[str] = Counter()
        self._buckets: dict[str, _Bucket] = {}

    def bucket(self, model: str, behavior: Behavior) -> _Bucket | None:
        """The model's rate-limit bucket, full when first asked for; None without a limit."""
        rpm = behavior.rate_limit_rpm
        if rpm is None:
            return None
        bucket = self._buckets.get(model)
        if bucket is None:
            capacity = behavior.rate_limit_burst or rpm
            bucket = self._buckets[model] = _Bucket(rpm, capacity, capacity, time.monotonic())
        return bucket

    @property
    def arrived(self) -> int:
        return sum(self._calls.values())

    def decide(self, model: str, bucket: _Bucket | None, behavior: Behavior) -> Outcome:
        if bucket is not None and not bucket.take(time.monotonic()):
            return "rate_limited"
        self._calls[model] += 1
        if self._calls[model] <= behavior.fail_first:
            return "error"
        if behavior.timeout_rate and self._random.random() < behavior.timeout_rate:
            return "hang"
        if behavior.error_rate and self._random.random() < behavior.error_rate:
            return "error"
        return "answer"


class _Request(NamedTuple):
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


class _BadRequest(Exception):
    """The bytes on the connection are not an HTTP/1.1 request we serve; the connection closes."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    """The next request on the connection, or None when the client closed it between requests."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    except asyncio.LimitOverrunError as exc:
        raise _BadRequest(431, "request head too large") from exc
    request_line, *lines = head[:-4].decode("latin-1").split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3:
        raise _BadRequest(400, "malformed request line")
    method, target, version = parts
    headers = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon:
            raise _BadRequest(400, "malformed header line")
        headers[name.strip().lower()] = value.strip()
    if "transfer-encoding" in headers:
        raise _BadRequest(411, "send request bodies with Content-Length")
    length = headers.get("content-length", "0")
    if not length.isdigit():
        raise _BadRequest(400, "malformed Content-Length")
    body = await reader.readexactly(int(length)) if length != "0" else b""
    keep_alive = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
    path, _, query = target.partition("?")
    return _Request(method, path, query, headers, body, keep_alive)


@functools.cache
def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Overloaded" if status == 529 else "Error"


def _head(status: int, keep_alive: bool, headers: Iterable[Header]) -> bytes:
    lines = [f"HTTP/1.1 {status} {_reason(status)}", *(f"{k}: {v}" for k, v in headers)]
    if not keep_alive:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _json(status: int, obj: object, keep_alive: bool, headers: Iterable[Header] = ()) -> bytes:
    body = orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)
    fields = [("content-type", "application/json"), ("content-length", str(len(body))), *headers]
    return _head(status, keep_alive, fields) + body


class _Cut(bytes):
    """A response the connection closes after, unfinished (an injected failure mid-body)."""


@dataclass(frozen=True)
class _Paced:
    """A response written in ``parts``, each ``waits[n]`` seconds after the one before (a
    provider generating slowly); ``cut``: the connection closes after them, the body
    unfinished."""

    parts: list[bytes]
    waits: list[float]
    cut: bool


Response = bytes | _Paced


def _sse(
    events: Iterable[bytes],
    keep_alive: bool,
    cut_after: int | None,
    headers: Iterable[Header],
    behavior: Behavior,
) -> Response:
    """A streamed answer of ``events``, cut after ``cut_after`` of them, paced or stalled as
    ``behavior`` says."""
    fields = [
        ("content-type", "text/event-stream"),
        ("cache-control", "no-cache"),
        ("transfer-encoding", "chunked"),
        *headers,
    ]
    chunks = [b"%x\r\n%s\r\n" % (len(event), event) for event in events][:cut_after]
    head = _head(200, keep_alive, fields)
    cut = cut_after is not None
    ending = b"" if cut else b"0\r\n\r\n"
    gap, stall = behavior.chunk_gap_ms / 1000, behavior.stream_stall_after
    if (gap or stall) and chunks:
        parts = [head + chunks[0], *chunks[1:]]
        parts[-1] += ending  # the body ends with its last event, not a wait after it
        waits = [behavior.hang_s if n == stall else gap for n in range(len(parts))]
        return _Paced(parts, waits, cut)
    whole = b"".join([head, *chunks, ending])
    return _Cut(whole) if cut else whole


def _has_key(headers: dict[str, str]) -> bool:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return (scheme.lower() == "bearer" and bool(token.strip())) or bool(headers.get("x-api-key"))


def _retry_headers(seconds: float) -> list[Header]:
    return [
        ("retry-after", str(math.ceil(seconds))),
        # Rounded up (past float noise): a caller back a moment early would be refused again.
        ("retry-after-ms", str(math.ceil(round(seconds * 1000, 6)))),
    ]


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return parsed


Handler = Callable[[_Request], Awaitable[Response | None]]


class MockProvider:
    """A fake OpenAI and Anthropic on loopback, over real HTTP/1.1 with keep-alive.

    Use it as an async context manager; ``url`` is the ``api_base`` for both kinds::

        config = MockConfig(models={"gpt-flaky": Behavior(fail_first=2, error_status=503)})
        async with MockProvider(config) as mock:
            ...  # point a deployment at mock.url with model "gpt-flaky"
            assert mock.stats.by_status[503] == 2
            assert mock.requests[-1].messages[0]["content"] == "hi"

    Faults follow the model named in each request body, so tests give each deployment its own
    model name to give it its own faults. Requests that are not valid for the provider get 400
    at once, without faults or latency, as the real APIs answer them.
    """

    def __init__(
        self, config: MockConfig | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self._config = config or MockConfig()
        self._host, self._port = host, port
        self._faults = _Faults(self._config.seed)
        self._cache = PromptCache()
        self._stats = Stats(log=deque(maxlen=self._config.log_size))
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self._server: asyncio.Server | None = None
        self._closing = False
        self._connections: set[asyncio.Task[None]] = set()
        self._routes: dict[tuple[str, str], Handler] = {
            ("POST", OPENAI.path): functools.partial(self._call, OPENAI),
            ("POST", VLLM_SERVER.path): functools.partial(self._call, VLLM_SERVER),
            ("POST", ANTHROPIC.path): functools.partial(self._call, ANTHROPIC),
            ("GET", "/_mock/stats"): self._get_stats,
            ("POST", "/_mock/config"): self._post_config,
            ("POST", "/_mock/reset"): self._post_reset,
        }

    async def __aenter__(self) -> Self:
        if self._server is not None:
            raise RuntimeError("a MockProvider starts once; make a new one")
        self._server = await asyncio.start_server(
            self._accept, self._host, self._port, backlog=1024
        )
        self._port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        server = self._server
        if server is None or self._closing:
            return
        self._closing = True
        server.close()
        # Python 3.11 leaves accepted connections open on close: idle keep-alive ones and
        # injected hangs would outlive the mock, so end them here.
        while self._connections:
            for task in self._connections:
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
        await server.wait_closed()

    @property
    def url(self) -> str:
        """``http://host:port``, the ``api_base`` for both OpenAI and Anthropic deployments."""
        if self._server is None:
            raise RuntimeError("the mock provider is not running; use `async with`")
        return f"http://{self._host}:{self._port}"

    @property
    def vllm_url(self) -> str:
        """The ``api_base`` of an ``openai_compatible`` deployment: the mock as vLLM's
        OpenAI-compatible server, which takes what OpenAI refuses (more than 4 ``stop``
        sequences, its own sampling parameters)."""
        return self.url + VLLM_PREFIX

    @property
    def config(self) -> MockConfig:
        return self._config

    def configure(self, config: MockConfig) -> None:
        """Swap the behaviour; fault state (fail_first counts, rate buckets) starts afresh."""
        self._config = config
        self._faults = _Faults(config.seed)
        if self._stats.log.maxlen != config.log_size:
            self._stats.log = deque(self._stats.log, maxlen=config.log_size)

    def reset(self) -> None:
        """Clear counters, the log, fault state and the prompt cache; the behaviour stays."""
        self._stats = Stats(log=deque(maxlen=self._config.log_size))
        self._faults = _Faults(self._config.seed)
        self._cache = PromptCache()

    @property
    def stats(self) -> Stats:
        return self._stats

    @property
    def requests(self) -> list[CallRecord]:
        """The logged model calls, oldest first."""
        return list(self._stats.log)

    @property
    def arrived(self) -> int:
        """Model calls received since the last reset and not rate-limited, counted as they
        arrive: ``stats.calls`` counts them only once answered, after their latency."""
        return self._faults.arrived

    async def wait_for_calls(self, n: int) -> None:
        """Wait until ``n`` model calls have been answered or hung up on since the last reset.

        Wrap it in ``asyncio.timeout`` in tests: it waits as long as it takes.
        """
        await self._until(lambda: self._stats.calls >= n)

    async def wait_for_arrivals(self, n: int) -> None:
        """Wait until ``n`` model calls have arrived (``arrived``): with a latency, the last
        is still running, its caller waiting for the answer (``wait_for_calls`` returns only
        once it is sent, when the caller may have read it already)."""
        await self._until(lambda: self.arrived >= n)

    async def _until(self, met: Callable[[], bool]) -> None:
        if met():
            return
        future = asyncio.get_running_loop().create_future()
        self._waiters.append((met, future))
        await future

    def _wake(self) -> None:
        """Wake the waiters whose condition now holds."""
        waiting = []
        for met, future in self._waiters:
            if future.done():
                continue
            if met():
                future.set_result(None)
            else:
                waiting.append((met, future))
        self._waiters = waiting

    def _record(self, request: _Request, body: dict[str, Any] | None, status: int | None) -> None:
        model = body.get("model") if body is not None else None
        model = model if isinstance(model, str) else None
        stats = self._stats
        stats.calls += 1
        if model is not None:
            stats.by_model[model] += 1
        if status is None:
            stats.hung += 1
        else:
            stats.by_status[status] += 1
        record = CallRecord(
            t=time.monotonic(),
            wall=time.time(),
            path=request.path,
            model=model,
            status=status,
            stream=body is not None and body.get("stream") is True,
            had_key=_has_key(request.headers),
            body=body,
        )
        stats.log.append(record)
        if self._waiters:
            self._wake()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing:  # accepted just before close
            writer.close()
            return
        # Our own task rather than a coroutine callback: 3.11's callback wrapper reports a
        # cancelled callback as an error, and we cancel connections on close.
        task = asyncio.create_task(self._connection(reader, writer))
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while (request := await _read_request(reader)) is not None:
                handler = self._routes.get((request.method, request.path), self._not_found)
                response = await handler(request)
                if response is None:  # hung up on purpose
                    return
                if isinstance(response, _Paced):
                    for n, part in enumerate(response.parts):
                        if n:
                            await asyncio.sleep(response.waits[n])
                        writer.write(part)
                        await writer.drain()
                    cut = response.cut
                else:
                    writer.write(response)
                    await writer.drain()
                    cut = isinstance(response, _Cut)
                if not request.keep_alive or cut:
                    return
        except _BadRequest as exc:
            error = {"error": {"message": str(exc), "type": "invalid_request_error"}}
            writer.write(_json(exc.status, error, keep_alive=False))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away mid-request
        except Exception:
            log.exception("mock provider: unexpected error; closing the connection")
        finally:
            writer.close()

    async def _call(self, wire: Wire, request: _Request) -> Response | None:
        body = None
        try:
            body = _json_object(request.body)
            reply = wire.reply(body, self._cache)
        except InvalidRequest as exc:
            self._record(request, body, 400)
            return _json(400, wire.error(400, str(exc)), request.keep_alive)
        model: str = body["model"]
        behavior = self._config.behavior(model)
        if behavior.refusal is not None:
            reply = replace(reply, refusal=behavior.refusal)
        bucket = self._faults.bucket(model, behavior)
        outcome = self._faults.decide(model, bucket, behavior)
        if self._waiters:
            self._wake()  # arrived
        # Like OpenAI and Anthropic, a rate-limited model states its limit on every answer.
        quota = bucket.quota(wire) if bucket is not None else []
        if outcome == "hang":
            self._record(request, body, None)
            await asyncio.sleep(behavior.hang_s)
            return None
        if behavior.latency_ms:
            await asyncio.sleep(behavior.latency_ms / 1000)
        if outcome == "answer":
            self._record(request, body, 200)
            reply = replace(
                reply, layout=behavior.layout, tool_input=behavior.tool_input, usage=behavior.usage
            )
            if body.get("stream") is True:
                events: Iterable[bytes] = wire.events(body, reply)
                cut = behavior.stream_cut_after
                if behavior.stream_error is not None:
                    events = [*list(events)[:cut], wire.error_event(behavior.stream_error)]
                    cut = None
                return _sse(events, request.keep_alive, cut, quota, behavior)
            answer = _json(200, wire.completion(body, reply), request.keep_alive, quota)
            if behavior.body_cut_after is not None:
                head = answer.index(b"\r\n\r\n") + 4
                return _Cut(answer[: head + behavior.body_cut_after])
            return answer
        if outcome == "rate_limited":
            assert bucket is not None
            status, wait = 429, bucket.next_in()
            message = f"mock: rate limit of {bucket.rpm} requests/min reached for {model}"
            error = wire.error(429, message)
        else:
            status, wait = behavior.error_status, 1.0
            message = f"mock: injected {status} for {model}"
            error = behavior.error_body or wire.error(status, message)
        self._record(request, body, status)
        if status == 429:
            retry = behavior.retry_after if behavior.retry_after is not None else wait
            quota = [*_retry_headers(retry), *quota]
        return _json(status, error, request.keep_alive, quota)

    async def _get_stats(self, request: _Request) -> bytes:
        with_log = parse_qs(request.query).get("log") == ["1"]
        return _json(200, self._stats.to_json(with_log=with_log), request.keep_alive)

    async def _post_config(self, request: _Request) -> bytes:
        try:
            config = MockConfig.model_validate_json(request.body)
        except ValidationError as exc:
            error = {"error": {"message": str(exc), "type": "invalid_request_error"}}
            return _json(400, error, request.keep_alive)
        self.configure(config)
        return _json(200, config.model_dump(mode="json"), request.keep_alive)

    async def _post_reset(self, request: _Request) -> bytes:
        self.reset()
        return _json(200, {"ok": True}, request.keep_alive)

    async def _not_found(self, request: _Request) -> bytes:
        message = f"no route for {request.method} {request.path}"
        error = {"error": {"message": message, "type": "not_found_error"}}
        return _json(404, error, request.keep_alive)


async def serve(config: MockConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
    """Run a mock provider until cancelled (the ``queuegate mock-provider`` command)."""
    async with MockProvider(config, host, port) as mock:
        log.info("mock provider listening on %s", mock.url)
        await asyncio.Event().wait()
