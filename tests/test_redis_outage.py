"""Admission while Redis is cut off (by a proxy; the shared Redis keeps running)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from tests.proxy import TcpProxy
from tests.support import running_gateway, wait_until
from tests.teams import register

HELLO = [{"role": "user", "content": "Hello"}]


async def test_fail_closed_holds_jobs_until_redis_returns_and_loses_none(
    settings: Settings,
) -> None:
    # Given a limited team and a fail-closed worker reaching Redis through a proxy
    await register(settings, "alpha", TeamConfig(rpm=1000))
    async with TcpProxy(settings.redis_url) as proxy:
        s = settings.model_copy(update={"redis_url": proxy.url, "redis_outage": "fail_closed"})
        async with running_gateway(s) as gw, gw.client("alpha") as client:
            admission = gw.worker.admission
            assert admission is not None

            # When Redis goes away while jobs arrive
            await proxy.down()
            handles = [await client.submit(client.job("gpt-4o-mini", HELLO)) for _ in range(3)]
            await wait_until(lambda: admission.outage.down, timeout=30)

            # Expect no provider called while it is away
            assert gw.mock.stats.calls == 0

            # and, once it is back, every job served
            await proxy.up()
            results = await asyncio.gather(*(h.result(timeout=30) for h in handles))
            assert {r.status for r in results} == {"ok"}
            assert gw.mock.stats.calls == 3
            assert not admission.outage.down


async def test_fail_open_serves_from_a_local_bucket_while_redis_is_away(
    settings: Settings,
) -> None:
    # Given a team of 4 requests per minute, all 4 at once, and a fail-open worker with a
    # half share of it
    await register(settings, "alpha", TeamConfig(rpm=4, burst=4))
    async with TcpProxy(settings.redis_url) as proxy:
        s = settings.model_copy(
            update={"redis_url": proxy.url, "redis_outage": "fail_open", "admission_workers": 2}
        )
        async with running_gateway(s) as gw, gw.client("alpha") as client:
            admission = gw.worker.admission
            assert admission is not None

            # When Redis goes away and three jobs with a short deadline arrive
            await proxy.down()
            results = await asyncio.gather(
                *[
                    client.chat("gpt-4o-mini", HELLO, timeout=30, deadline=timedelta(seconds=5))
                    for _ in range(3)
                ]
            )

            # Expect two served from the worker's share (2 a minute), the third rate limited
            codes = sorted(r.error.code if r.error else "ok" for r in results)
            assert codes == ["ok", "ok", "rate_limited"]
            assert admission.outage.down

            # and the shared buckets used again once Redis is back
            await proxy.up()
            assert (await client.chat("gpt-4o-mini", HELLO, timeout=30)).status == "ok"
            assert not admission.outage.down
