"""How long a worker's Redis commands take under its own load, as the worker sees them: the
figure ``QUEUEGATE_REDIS_TIMEOUT`` must stay far above.

    .venv/bin/python -m bench.redis_latency --jobs 5000 --prefetch 256

A worker (in this process, on uvloop, as ``queuegate worker`` runs) serves ``--jobs`` jobs of
a team with rate limits and a budget (so every admission script runs) against the mock
provider, published by a client in the same process all at once: the worker's event loop is
as busy as it gets. Every command and pipeline of the process is timed from send to reply,
event-loop delays included, as a socket timeout counts them. Prints p50, p99, p99.9 and max.
Figures are noisy on a shared machine: say so when quoting them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import redis.asyncio.client as redis_client

from bench.measure import percentile
from bench.stack import TEAM, prepare
from mockprovider import Behavior, MockConfig, MockProvider
from producer import GatewayClient
from queuegate.db import create_pool
from queuegate.namespace import drop_namespace
from queuegate.registry import TeamConfig
from queuegate.runtime import run
from queuegate.settings import Settings
from router import load_catalog, open_router
from workers import Worker

SAMPLES: list[float] = []
"""Milliseconds of every command and pipeline sent while the run lasts."""


def _timed(send: Callable[..., Any]) -> Callable[..., Any]:
    async def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return await send(*args, **kwargs)
        finally:
            SAMPLES.append((time.perf_counter() - start) * 1000)

    return timed


async def measure(jobs: int, prefetch: int, latency_ms: float) -> dict[str, float]:
    tag = uuid.uuid4().hex[:8]
    settings = Settings(
        namespace=f"qgbench-{tag}", database_schema=f"qgbench_{tag}", prefetch=prefetch
    )
    limits = TeamConfig(rpm=10_000_000, tpm=10_000_000_000, budget_usd=Decimal(1_000_000))
    await prepare(settings, limits)
    # A pipeline's commands are queued on the pipeline and sent by its execute.
    original = (redis_client.Redis.execute_command, redis_client.Pipeline.execute)
    stop = asyncio.Event()
    try:
        async with MockProvider(MockConfig(default=Behavior(latency_ms=latency_ms))) as mock:
            env = {"QUEUEGATE_MOCK_URL": mock.url, "QUEUEGATE_MOCK_KEY": "bench-key"}
            catalog = load_catalog(settings.catalog, env)
            async with open_router(catalog, env, settings) as router:
                worker = Worker(settings, router, teams=[TEAM], name="bench-worker")
                working = asyncio.create_task(worker.run(stop))
                await asyncio.wait_for(worker.ready.wait(), 30)
                async with GatewayClient(settings, team=TEAM) as client:
                    redis_client.Redis.execute_command = _timed(original[0])  # type: ignore[method-assign]
                    redis_client.Pipeline.execute = _timed(original[1])  # type: ignore[method-assign]
                    message = [{"role": "user", "content": "hello"}]
                    handles = await asyncio.gather(
                        *(client.submit(client.job("gpt-4o-mini", message)) for _ in range(jobs))
                    )
                    results = await asyncio.gather(*(h.result(600) for h in handles))
                    redis_client.Redis.execute_command, redis_client.Pipeline.execute = original  # type: ignore[method-assign]
                stop.set()
                await working
        failed = sum(r.status != "ok" for r in results)
    finally:
        redis_client.Redis.execute_command, redis_client.Pipeline.execute = original  # type: ignore[method-assign]
        await drop_namespace(settings, [TEAM])
        pool = await create_pool(settings)
        try:
            await pool.execute(f"DROP SCHEMA IF EXISTS {settings.database_schema} CASCADE")
        finally:
            await pool.close()
    return {
        "jobs": jobs,
        "failed": failed,
        "commands": len(SAMPLES),
        "p50_ms": percentile(SAMPLES, 50),
        "p99_ms": percentile(SAMPLES, 99),
        "p99.9_ms": percentile(SAMPLES, 99.9),
        "max_ms": max(SAMPLES),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.redis_latency", description=__doc__)
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--prefetch", type=int, default=256)
    parser.add_argument("--latency-ms", type=float, default=0.0, help="the mock's answer time")
    args = parser.parse_args()
    figures = run(lambda: measure(args.jobs, args.prefetch, args.latency_ms))
    print(json.dumps({k: round(v, 2) for k, v in figures.items()}))


if __name__ == "__main__":
    main()
