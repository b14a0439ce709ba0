"""Percentiles and the shape every scenario reports."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any


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


def cpu_per_thousand(
    before: dict[str, float], after: dict[str, float], jobs: int
) -> dict[str, float]:
    """CPU seconds each process spent per 1,000 jobs."""
    return {
        f"cpu_s/1k {name}": round((after[name] - before[name]) * 1000 / jobs, 3)
        for name in after
        if name in before
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
