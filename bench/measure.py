"""Percentiles and the shape every scenario reports."""

from __future__ import annotations

import asyncio
import os
import resource
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

CHAT_BODY = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "Summarise the benefits of a message queue."}],
    "max_tokens": 16,
}
"""The OpenAI chat request of the HTTP scenarios (a direct call, LiteLLM Proxy)."""


def own_cpu() -> float:
    """CPU seconds this process has spent, user and system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


def latency_figures(ms: list[float]) -> dict[str, float]:
    return {
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
    }


@dataclass
class Figure:
    """One row of a scenario's table."""

    scenario: str
    case: str
    values: dict[str, Any] = field(default_factory=dict)


RATED = (
    "overhead",
    "throughput",
    "latency hiding",
    "litellm proxy",
    "frontdoor c=1",
    "frontdoor c=64",
    "tracing",
)
"""The scenarios whose figures are also given as multiples of the floor."""


RABBITMQ_CPU = "cpu_s/1k rabbitmq"


def against_floor(figures: list[Figure], floor: list[Figure]) -> None:
    """Add each gateway figure as a multiple of the floor measured in the same run, which
    machines of different speeds share: one-at-a-time latency against the floor's p50 at
    c=1, jobs/s under load against its round trips/s at c=64."""
    cases = {figure.case: figure.values for figure in floor}
    p50, rate = cases["c=1"]["p50_ms"], cases["c=64"]["per_s"]
    broker = cases["c=64"].get(RABBITMQ_CPU)
    for figure in figures:
        # Rows of a gateway run report a rate; the mock's own reference row does not.
        if figure.scenario not in RATED or "per_s" not in figure.values:
            continue
        values = figure.values
        if figure.case.endswith("c=1"):
            values["p50_vs_floor"] = round(values["p50_ms"] / p50, 2)
        else:
            values["per_s_vs_floor"] = round(values["per_s"] / rate, 2)
        if broker and RABBITMQ_CPU in values and not figure.case.endswith("c=1"):
            # RabbitMQ's CPU per job against its CPU per bare round trip under load.
            values["rabbitmq_vs_floor"] = round(values[RABBITMQ_CPU] / broker, 2)


def cpu_per_thousand(
    before: dict[str, float], after: dict[str, float], jobs: int
) -> dict[str, float]:
    """CPU seconds each process spent per 1,000 jobs."""
    return {
        f"cpu_s/1k {name}": round((after[name] - before[name]) * 1000 / jobs, 3)
        for name in after
        if name in before
    }


def cpu_bound(cpu: dict[str, float]) -> dict[str, float]:
    """Every process's CPU per 1,000 jobs together (``cpu_per_thousand``), and the jobs/s this
    machine's cores allow at that cost: how near a run came to the machine's limit."""
    total = sum(cpu.values())
    return {
        "cpu_s/1k all": round(total, 3),
        "cpu_bound_per_s": round((os.cpu_count() or 1) * 1000 / total) if total else 0,
    }


async def run_lanes(
    call: Callable[[], Awaitable[float]], jobs: int, concurrency: int
) -> list[float]:
    """Run ``jobs`` calls, ``concurrency`` at a time; each returns its latency in ms."""
    remaining = jobs
    ms: list[float] = []

    async def lane() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            ms.append(await call())

    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return ms


async def post_load(
    url: str,
    jobs: int,
    concurrency: int,
    headers: dict[str, str] | None = None,
    timing_header: str | None = None,
) -> tuple[list[float], float, list[float]]:
    """POST ``CHAT_BODY`` ``jobs`` times, ``concurrency`` at a time, one client per lane:
    latencies in ms, wall time, and the values of ``timing_header`` in the answers."""
    remaining = jobs
    ms: list[float] = []
    reported: list[float] = []

    async def lane() -> None:
        nonlocal remaining
        async with httpx.AsyncClient(timeout=60, headers=headers) as client:
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                response = await client.post(url, json=CHAT_BODY)
                ms.append((time.perf_counter() - started) * 1000)
                response.raise_for_status()
                if timing_header and (value := response.headers.get(timing_header)):
                    reported.append(float(value))

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return ms, time.perf_counter() - started, reported
