"""CPU per provider call for each HTTP client path, against the mock provider over loopback.

    .venv/bin/python -m bench.http_client [--calls 4000]

The mock provider runs as its own process, so each figure is this process's CPU alone (user +
system, from getrusage) per call: a POST answered with JSON, and a POST answered with a stream
of server-sent events, each at 1 and at 256 calls at once. Every call carries the same bounds
(a total time limit, a connect and a first-byte timeout) and decodes the whole answer.

- transport: ``router.transport`` as the router calls it (aiohttp, one pool per upstream)
- httpx: the router's path before it: 16 httpx pools taken in turn (httpcore scans a pool's
  connections on every request, so one pool of 1,000 costs more), streamed responses
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import resource
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import httpx
import orjson
from rich.console import Console
from rich.table import Table

from bench.measure import percentile, run_lanes
from bench.stack import free_port, wait_http
from queuegate.messages import ChatJob
from router import transport
from router.providers import OpenAIAdapter, UpstreamRequest

KEY = "bench-key"
CONNECT, FIRST_BYTE, TOTAL = 5.0, 20.0, 30.0
WARM_UP = 500
CONCURRENCY = (1, 256)

Call = Callable[[UpstreamRequest], Awaitable[Any]]


class _Httpx:
    """The former path: 16 pools of 62 connections, taken in turn."""

    def __init__(self, url: str) -> None:
        limits = httpx.Limits(max_connections=62, max_keepalive_connections=62)
        self.clients = [
            httpx.AsyncClient(base_url=url, limits=limits, timeout=None, trust_env=False)
            for _ in range(16)
        ]
        self._turn = itertools.cycle(self.clients)

    async def post(self, request: UpstreamRequest) -> Any:
        async with self._opened(request) as response:
            return orjson.loads(await response.aread())

    async def events(self, request: UpstreamRequest) -> int:
        parser, count = transport.EventParser(), 0
        async with self._opened(request) as response:
            async for line in response.aiter_lines():
                count += parser.feed(line) is not None
        return count

    @asynccontextmanager
    async def _opened(self, request: UpstreamRequest) -> AsyncIterator[httpx.Response]:
        client = next(self._turn)
        built = client.build_request(
            "POST",
            request.path,
            content=orjson.dumps(request.body),
            headers={"content-type": "application/json", **request.headers},
            timeout=httpx.Timeout(None, connect=CONNECT),
        )
        async with asyncio.timeout(FIRST_BYTE):
            response = await client.send(built, stream=True)
        try:
            yield response
        finally:
            await response.aclose()


def _transport_calls(upstream: transport.Upstream) -> tuple[Call, Call]:
    async def post(request: UpstreamRequest) -> Any:
        return await transport.post(upstream, request, KEY, connect=CONNECT, first_byte=FIRST_BYTE)

    async def events(request: UpstreamRequest) -> int:
        stream = transport.events(upstream, request, KEY, connect=CONNECT, first_byte=FIRST_BYTE)
        return len([event async for event in stream])

    return post, events


def _request(*, stream: bool) -> UpstreamRequest:
    job = ChatJob.model_validate(
        {
            "job_id": "bench",
            "team": "bench",
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "Summarise a message queue in one line."}],
            "params": {"max_tokens": 16},
        }
    )
    return OpenAIAdapter().build_request(job, "gpt-4o-mini", KEY, stream=stream)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _measure(
    call: Call, request: UpstreamRequest, calls: int, concurrency: int
) -> dict[str, Any]:
    async def one() -> float:
        started = time.perf_counter()
        async with transport.time_limit(TOTAL):
            await call(request)
        return (time.perf_counter() - started) * 1000

    await run_lanes(one, WARM_UP, concurrency)
    cpu, started = _cpu(), time.perf_counter()
    ms = await run_lanes(one, calls, concurrency)
    elapsed, cpu = time.perf_counter() - started, _cpu() - cpu
    return {
        "cpu_us/call": round(cpu * 1e6 / calls),
        "calls/s": round(calls / elapsed),
        "p50_ms": round(percentile(ms, 50), 2),
    }


async def main(calls: int) -> list[dict[str, Any]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    mock = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "queuegate", "mock-provider", "--port", str(port)),
        stdout=asyncio.subprocess.DEVNULL,
    )
    rows = []
    try:
        await wait_http(url)
        async with AsyncExitStack() as stack:
            upstream = await stack.enter_async_context(transport.Upstream(url))
            former = _Httpx(url)
            for client in former.clients:
                await stack.enter_async_context(client)
            clients = {
                "transport": _transport_calls(upstream),
                "httpx": (former.post, former.events),
            }
            for name, (post, events) in clients.items():
                for answer, call, stream in (("json", post, False), ("sse", events, True)):
                    for concurrency in CONCURRENCY:
                        figures = await _measure(call, _request(stream=stream), calls, concurrency)
                        row = {"client": name, "answer": answer, "concurrency": concurrency}
                        rows.append(row | figures)
    finally:
        mock.terminate()
        await mock.wait()
    return rows


def _report(rows: list[dict[str, Any]], calls: int) -> None:
    table = Table(title=f"HTTP client paths: {calls} calls per row, mock provider at 0 ms")
    for column in rows[0]:
        table.add_column(column, justify="left" if column in ("client", "answer") else "right")
    for row in rows:
        table.add_row(*(str(value) for value in row.values()))
    Console(width=120).print(table)
    print(json.dumps(rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=4000, help="calls per measured row")
    args = parser.parse_args()
    from queuegate.runtime import run

    _report(run(lambda: main(args.calls)), args.calls)
