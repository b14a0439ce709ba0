"""The job rates ``queuegate status`` and the Live page show: count over the last minute."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import redis.asyncio as aioredis

import queuegate.status
from queuegate.keys import Keys
from queuegate.livestats import RATE_SPAN, LiveStatsWriter
from queuegate.settings import Settings
from queuegate.status import StatusReader
from tests.test_accounting import usage

BURST = 300


async def test_a_burst_of_jobs_reads_its_count_over_the_minute(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given a worker that finished 300 jobs of team alpha at once, its stats written
    writer = LiveStatsWriter(
        redis_client, Keys(settings.redis_prefix), "w1", 1.0, lambda: {"alpha": 0}
    )
    for i in range(BURST):
        writer.taken("alpha")
        writer.finished(usage(f"job-{i}"), [])
    await writer.flush()

    # When the status is read
    async with StatusReader(settings) as reader:
        [alpha] = (await reader.read(["alpha"])).teams

    # Expect 300 jobs over 60 seconds: 5.0 per second in and out, no more while the minute
    # is young
    assert (alpha.jobs_in_per_s, alpha.jobs_out_per_s) == (5.0, 5.0)


async def test_a_burst_counts_the_same_for_the_whole_minute_after_it(
    settings: Settings, redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given 300 jobs finished within one second, their stats written
    writer = LiveStatsWriter(
        redis_client, Keys(settings.redis_prefix), "w1", 1.0, lambda: {"alpha": 0}
    )
    first = int(time.time())
    for i in range(BURST):
        writer.finished(usage(f"job-{i}"), [])
    await writer.flush()
    last = int(time.time())  # the burst's last second: the same as its first, nearly always

    # When the status is read at every second of the minute after it that still holds its
    # first second, and once the minute holds none of it
    clock = SimpleNamespace(time=time.time)
    monkeypatch.setattr(queuegate.status, "time", clock)
    seen = []
    counted = RATE_SPAN - (last - first)
    async with StatusReader(settings) as reader:
        for offset in [*range(counted), RATE_SPAN]:
            clock.time = lambda offset=offset: last + offset + 0.5
            [alpha] = (await reader.read(["alpha"])).teams
            seen.append(alpha.jobs_out_per_s)

    # Expect 5.0 throughout (not 6.0 falling to 5.1 as the oldest window aged, then 0 at
    # 55 s), then 0 once its second has left the minute
    assert seen == [BURST / RATE_SPAN] * counted + [0.0]
