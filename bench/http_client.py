"""CPU per provider call for each HTTP client path, against the mock provider over loopback.

    .venv/bin/python -m bench.http_client [--calls 4000]

The mock provider runs as its own process, so each figure is this process's CPU alone (user +
system, from getrusage) per call: a POST answered with JSON, and a POST answered with a stream
of server-sent events, each at 1 and at 256 calls at once. Every call carries the same bounds
(a total time limit, a connect and a first-byte timeout) and decodes the whole answer.

Then memory, with tracemalloc: a fresh client with 1,000 connections, then one with 100,
sends 1,000 calls at once to a model answering in 500 ms; the figures are the most it held
per call (in flight, or waiting for a connection with 100), and with 1,000 what it keeps
per idle connection afterwards.

- transport: ``router.transport`` as the router calls it (aiohttp, one pool per upstream)
- httpx: the router's path before it: 16 httpx pools taken in turn (httpcore scans a pool's
  connections on every request, so one pool of 1,000 costs more), streamed responses
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol

import httpx
import orjson
from rich.console import Console
from rich.table import Table

from bench.measure import own_cpu, percentile, run_lanes
from bench.stack import free_port, wait_http
from queuegate.messages import ChatJob
from router import transport
from router.providers import OpenAIAdapter, UpstreamRequest

KEY = "bench-key"
CONNECT, FIRST_BYTE, TOTAL = 5.0, 20.0, 30.0
WARM_UP = 500
CONCURRENCY = (1, 256)
AT_ONCE, SLOW_MS = 1000, 500
"""The memory figures: calls sent at once, and how long the mock takes to answer each."""

Call = Callable[[UpstreamRequest], Awaitable[Any]]


class _Client(Protocol):
    def __init__(self, url: str, connections: int) -> None: ...
    async def post(self, request: UpstreamRequest) -> Any: ...
    async def events(self, request: UpstreamRequest) -> int: ...
    async def aclose(self) -> None: ...


class _Transport:
    def __init__(self, url: str, connections: int) -> None:
        self._upstream = transport.Upstream(url, connections=connections)

    # Each call holding one of the connections, as the router's do (Upstream.free).
    async def post(self, request: UpstreamRequest) -> Any:
        async with self._upstream.free:
            return await transport.post(
                self._upstream, request, KEY, connect=CONNECT, first_byte=FIRST_BYTE
            )

    async def events(self, request: UpstreamRequest) -> int:
        async with self._upstream.free:
            stream = transport.events(
                self._upstream, request, KEY, connect=CONNECT, first_byte=FIRST_BYTE
            )
            return len([event async for event in stream])

    async def aclose(self) -> None:
        await self._upstream.aclose()


class _Httpx:
    """The former path: 16 pools (of 62 connections for 1,000), taken in turn."""

    def __init__(self, url: str, connections: int) -> None:
        size = connections // 16
        limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
        self._clients = [
            httpx.AsyncClient(base_url=url, limits=limits, timeout=None, trust_env=False)
            for _ in range(16)
        ]
        self._turn = itertools.cycle(self._clients)

    async def aclose(self) -> None:
        await asyncio.gather(*(client.aclose() for client in self._clients))

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


CLIENTS: dict[str, type[_Client]] = {"transport": _Transport, "httpx": _Httpx}


def _request(model: str = "gpt-4o-mini", *, stream: bool = False) -> UpstreamRequest:
    job = ChatJob.model_validate(
        {
            "job_id": "bench",
            "team": "bench",
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "Summarise a message queue in one line."}],
            "params": {"max_tokens": 16},
        }
    )
    return OpenAIAdapter().build_request(job, model, KEY, stream=stream)


async def _measure(
    call: Call, request: UpstreamRequest, calls: int, concurrency: int
) -> dict[str, Any]:
    async def one() -> float:
        started = time.perf_counter()
        async with transport.time_limit(TOTAL):
            await call(request)
        return (time.perf_counter() - started) * 1000

    await run_lanes(one, WARM_UP, concurrency)
    cpu, started = own_cpu(), time.perf_counter()
    ms = await run_lanes(one, calls, concurrency)
    elapsed, cpu = time.perf_counter() - started, own_cpu() - cpu
    return {
        "cpu_us/call": round(cpu * 1e6 / calls),
        "calls/s": round(calls / elapsed),
        "p50_ms": round(percentile(ms, 50), 2),
    }


async def _memory(client_type: type[_Client], url: str, connections: int) -> dict[str, Any]:
    request = _request("slow")
    gc.collect()
    tracemalloc.start()
    try:
        client = client_type(url, connections)
        idle = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        await asyncio.gather(*(client.post(request) for _ in range(AT_ONCE)))
        peak = tracemalloc.get_traced_memory()[1]
        gc.collect()
        pooled = tracemalloc.get_traced_memory()[0]
        await client.aclose()
    finally:
        tracemalloc.stop()
    return {
        "kb/call": round((peak - idle) / AT_ONCE / 1024, 1),
        # With fewer connections than calls, what stays is mostly not the connections'.
        "kb/idle connection": round((pooled - idle) / AT_ONCE / 1024, 1)
        if connections >= AT_ONCE
        else "-",
    }


async def main(calls: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    mock = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "cli", "mock-provider", "--port", str(port)),
        stdout=asyncio.subprocess.DEVNULL,
    )
    cpu_rows, memory_rows = [], []
    try:
        await wait_http(url)
        for name, client_type in CLIENTS.items():
            client = client_type(url, transport.MAX_CONNECTIONS)
            try:
                for answer, call, stream in (
                    ("json", client.post, False),
                    ("sse", client.events, True),
                ):
                    for concurrency in CONCURRENCY:
                        figures = await _measure(call, _request(stream=stream), calls, concurrency)
                        row = {"client": name, "answer": answer, "concurrency": concurrency}
                        cpu_rows.append(row | figures)
            finally:
                await client.aclose()
        async with httpx.AsyncClient() as control:
            slow = {"models": {"slow": {"latency_ms": SLOW_MS}}}
            (await control.post(f"{url}/_mock/config", json=slow)).raise_for_status()
        for connections in (transport.MAX_CONNECTIONS, 100):
            for name, client_type in CLIENTS.items():
                row = {"client": name, "connections": connections}
                memory_rows.append(row | await _memory(client_type, url, connections))
    finally:
        mock.terminate()
        await mock.wait()
    return cpu_rows, memory_rows


def _report(rows: tuple[list[dict[str, Any]], list[dict[str, Any]]], calls: int) -> None:
    cpu, memory = rows
    titles = (
        f"CPU: {calls} calls per row, mock provider at 0 ms",
        f"memory: {AT_ONCE} calls at once, mock provider at {SLOW_MS} ms",
    )
    console = Console(width=120)
    for title, table_rows in zip(titles, rows, strict=True):
        table = Table(title=title)
        for column in table_rows[0]:
            table.add_column(column, justify="left" if column in ("client", "answer") else "right")
        for row in table_rows:
            table.add_row(*(str(value) for value in row.values()))
        console.print(table)
    print(json.dumps({"cpu": cpu, "memory": memory}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=4000, help="calls per measured CPU row")
    args = parser.parse_args()
    from queuegate.runtime import run

    _report(run(lambda: main(args.calls)), args.calls)
