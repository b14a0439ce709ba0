"""Router resilience figures: what retries, breakers and selection cost, and what they save.

    .venv/bin/python -m bench.resilience [--jobs 1000] [--concurrency 50]

Everything runs on loopback: the mock provider in this process, Redis from QUEUEGATE_REDIS_URL
under a namespace of its own (deleted at the end). Three scenarios, each a fixed number of jobs:

- baseline: bare POSTs through router.transport to the same mock, no router, for comparison
- healthy:  one deployment, no faults: throughput and latency with two Redis health checks
            per call (allow, then report)
- flaky:    primary with 30 % 500s and 10 % hangs (timeout 0.5 s), healthy fallback
- dead:     primary failing every call, breaker at 5 failures: calls that still reach it

Wall-clock figures are noisy on a shared machine; ``cpu_ms_per_job`` (this process's CPU time,
the mock's included, per job) is the steadier one to compare with the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from collections import Counter
from decimal import Decimal
from typing import Any

from rich.console import Console
from rich.table import Table

from mockprovider import Behavior, MockConfig, MockProvider
from mockprovider.catalog import mock_deployment
from queuegate.errors import JobError
from queuegate.messages import Attempt, ChatJob, ChatMessage
from queuegate.redis_client import redis_for
from queuegate.settings import Settings
from router import Catalog, Routed, open_router, transport
from router.providers import UpstreamRequest

ENV = {"QUEUEGATE_MOCK_KEY": "bench"}
WARMUP = 200
_AUTH = {"Authorization": "Bearer bench"}


def _catalog(url: str) -> Catalog:
    return Catalog.model_validate(
        {
            "resilience": {
                "retry": {"attempts": 2, "base_delay": 0.05, "max_delay": 0.5},
                "breaker": {"failures": 5, "cooldown": 60},
            },
            "models": {
                "healthy": {"deployments": [mock_deployment("healthy-dep", "healthy", url)]},
                "flaky": {
                    "fallbacks": ["backup"],
                    "deployments": [mock_deployment("flaky-dep", "flaky", url, timeout=0.5)],
                },
                "dead": {
                    "fallbacks": ["backup"],
                    "deployments": [mock_deployment("dead-dep", "dead", url)],
                },
                "backup": {"deployments": [mock_deployment("backup-dep", "backup", url)]},
            },
        }
    )


def _job(alias: str) -> ChatJob:
    return ChatJob(
        job_id=uuid.uuid4().hex,
        team="bench",
        model=alias,
        messages=[ChatMessage(role="user", content="Hello there")],
    )


class _Plain:
    """The baseline: one bare POST per job, no router (no checks, no translation)."""

    def __init__(self, upstream: transport.Upstream) -> None:
        self._upstream = upstream

    async def complete(self, job: ChatJob) -> Routed:
        body = {"model": job.model, "messages": [m.model_dump() for m in job.messages]}
        request = UpstreamRequest("/v1/chat/completions", body, _AUTH)
        async with self._upstream.free:  # as the router's calls do
            _, answer = await transport.post(self._upstream, request, None)
        usage = answer["usage"]
        return Routed(
            response=answer,
            model_used=job.model,
            deployment="plain",
            provider="openai",
            fallback_used=False,
            attempts=[Attempt(model=job.model, deployment="plain", provider="openai")],
            input_tokens=usage["prompt_tokens"],
            output_tokens=usage["completion_tokens"],
            cached_tokens=0,
            cost_usd=Decimal(0),
            latency_ms=0.0,
        )


async def _scenario(
    router: Any, mock: MockProvider, alias: str, jobs: int, concurrency: int
) -> dict[str, Any]:
    mock.reset()
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    served: list[Routed] = []
    failed = 0

    async def one() -> None:
        nonlocal failed
        async with gate:
            started = time.perf_counter()
            try:
                served.append(await router.complete(_job(alias)))
            except JobError:
                failed += 1
            latencies.append((time.perf_counter() - started) * 1000)

    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one() for _ in range(jobs)))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    attempts = [len(routed.attempts) for routed in served]
    quantiles = statistics.quantiles(latencies, n=100)
    return {
        "scenario": alias,
        "jobs": jobs,
        "ok": len(served),
        "failed": failed,
        "jobs_per_s": round(jobs / elapsed, 1),
        "cpu_ms_per_job": round(cpu * 1000 / jobs, 2),
        "p50_ms": round(quantiles[49], 1),
        "p99_ms": round(quantiles[98], 1),
        "mean_attempts": round(statistics.fmean(attempts), 2) if attempts else 0,
        "max_attempts": max(attempts, default=0),
        "calls_by_model": dict(Counter(mock.stats.by_model)),
    }


async def main(jobs: int, concurrency: int) -> list[dict[str, Any]]:
    settings = Settings(namespace=f"qgbench-{uuid.uuid4().hex[:8]}")
    faults = MockConfig(
        seed=1,
        models={
            "flaky": Behavior(error_rate=0.3, timeout_rate=0.1, hang_s=5),
            "dead": Behavior(error_rate=1.0),
        },
    )
    rows = []
    try:
        async with (
            MockProvider(faults) as mock,
            transport.Upstream(mock.url) as plain,
            open_router(_catalog(mock.url), ENV, settings) as router,
        ):
            # Warm up both (connections, Redis script load, lazily built pydantic validators):
            # without it the first scenario measured pays for them.
            for warm in (_Plain(plain), router):
                await _scenario(warm, mock, "healthy", WARMUP, concurrency)
            rows.append(await _scenario(_Plain(plain), mock, "healthy", jobs, concurrency))
            for alias in ("healthy", "flaky", "dead"):
                rows.append(await _scenario(router, mock, alias, jobs, concurrency))
        rows[0]["scenario"] = "baseline"
    finally:
        client = redis_for(settings)
        keys = [k async for k in client.scan_iter(match=f"{settings.redis_prefix}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
    return rows


def _report(rows: list[dict[str, Any]], jobs: int, concurrency: int) -> None:
    table = Table(title=f"router resilience: {jobs} jobs per scenario, {concurrency} at once")
    columns = [
        "scenario",
        "ok",
        "failed",
        "jobs_per_s",
        "cpu_ms_per_job",
        "p50_ms",
        "p99_ms",
        "mean_attempts",
    ]
    for column in [*columns, "max_attempts", "calls_by_model"]:
        table.add_column(
            column, justify="left" if column in ("scenario", "calls_by_model") else "right"
        )
    for row in rows:
        calls = ", ".join(f"{k} {v}" for k, v in sorted(row["calls_by_model"].items()))
        table.add_row(*(str(row[c]) for c in columns), str(row["max_attempts"]), calls)
    console = Console(width=150)
    console.print(table)
    print(json.dumps(rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args()
    _report(asyncio.run(main(args.jobs, args.concurrency)), args.jobs, args.concurrency)
