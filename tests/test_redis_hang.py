"""A worker whose Redis hangs (it neither answers nor refuses, as after SIGSTOP): its commands
fail within ``redis_timeout`` and the outage rules apply, instead of jobs waiting forever."""

from __future__ import annotations

import asyncio

from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from tests.proxy import TcpProxy
from tests.support import running_gateway, wait_until
from tests.teams import register

HELLO = [{"role": "user", "content": "Hello"}]
TIMEOUT = 0.3
"""The test's Redis timeout: short, so that the outage is seen at once."""


async def test_a_hung_redis_holds_jobs_uncalled_and_each_is_served_once_when_it_resumes(
    settings: Settings,
) -> None:
    # Given a limited team and a fail-closed worker reaching Redis through a proxy
    await register(settings, "alpha", TeamConfig(rpm=1000, budget_usd=100))
    async with TcpProxy(settings.redis_url) as proxy:
        s = settings.model_copy(
            update={"redis_url": proxy.url, "redis_outage": "fail_closed", "redis_timeout": TIMEOUT}
        )
        async with running_gateway(s) as gw, gw.client("alpha") as client:
            admission = gw.worker.admission
            assert admission is not None
            assert (await client.chat("gpt-4o-mini", HELLO, timeout=30)).status == "ok"

            # When Redis hangs, its connections open, while jobs arrive
            proxy.hang()
            handles = [await client.submit(client.job("gpt-4o-mini", HELLO)) for _ in range(3)]

            # Expect the worker to find Redis unavailable within its timeout and its resends,
            # rather than wait on the open connections, and to call no provider meanwhile
            await wait_until(lambda: admission.outage.down, timeout=10)
            assert gw.mock.stats.calls == 1

            # and, once Redis resumes (running what it was sent meanwhile), every job served
            # once: one call each, one usage row each
            await proxy.up()
            results = await asyncio.gather(*(h.result(timeout=60) for h in handles))
            assert {r.status for r in results} == {"ok"}
            assert gw.mock.stats.calls == 4
            rows = await gw.usage_rows(4, timeout=30)
            assert len({r["job_id"] for r in rows}) == 4
            assert {h.job_id for h in handles} <= {r["job_id"] for r in rows}
            await wait_until(lambda: not admission.outage.down, timeout=30)
