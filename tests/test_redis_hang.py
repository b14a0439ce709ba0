"""A worker whose Redis hangs (it neither answers nor refuses, as after SIGSTOP): its commands
fail within ``redis_timeout`` and the outage rules apply, instead of jobs waiting forever."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from decimal import Decimal

import pytest
import redis.asyncio as aioredis

from mockprovider import Behavior, MockConfig
from queuegate.errors import ServiceUnavailable
from queuegate.keys import Keys
from queuegate.messages import ChatJob
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from queuegate.spend import NANO, current_month, ledger_spent
from router import load_catalog
from tests.proxy import TcpProxy
from tests.support import running_gateway, wait_until
from tests.teams import register
from workers.admission.estimate import estimate

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


async def test_resends_refused_as_answered_after_a_hang_leave_the_ledger_at_the_usage_rows(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given a team whose budget holds its jobs' estimates (at their max_tokens, so they run
    # at once), and one more job's by what they really cost, but not one more estimate; its
    # fail-closed worker reaching Redis through a proxy, accounting reconciling its ledger
    # only at start
    calls, catalog = 4, load_catalog(None, {"QUEUEGATE_MOCK_URL": "http://127.0.0.1:9"})
    output = settings.expected_output_tokens
    one = estimate(
        ChatJob(
            job_id="x",
            team="alpha",
            model="gpt-4o-mini",
            messages=HELLO,
            params={"max_tokens": output},
        ),
        catalog,
        TeamConfig(),
        output,
    ).cost_nano
    budget = Decimal(calls * one + one // 2) / NANO
    await register(settings, "alpha", TeamConfig(budget_usd=budget))
    keys, month = Keys(settings.redis_prefix), current_month()
    async with TcpProxy(settings.redis_url) as proxy:
        s = settings.model_copy(
            update={
                "redis_url": proxy.url,
                "redis_outage": "fail_closed",
                "redis_timeout": TIMEOUT,
                "claim_lease": 1.0,
                "spend_reconcile_interval": 3600.0,
            }
        )
        slow = MockConfig(default=Behavior(latency_ms=2500))
        async with (
            running_gateway(s, mock_config=slow) as gw,
            gw.client("alpha") as first,
            gw.client("alpha") as again,
        ):
            jobs = [
                first.job("gpt-4o-mini", HELLO, job_id=f"hung-{i}", max_tokens=output)
                for i in range(calls)
            ]
            sent = [await first.submit(job) for job in jobs]

            # When Redis hangs past its command bound with the jobs' calls in flight (each
            # recorded in its claim before it leaves), the same jobs sent again meanwhile and
            # their first calls accounted
            claims = [keys.claim("alpha", job.job_id) for job in jobs]
            async with asyncio.timeout(10):
                # Polled: no event says a call left.
                while not all([await redis_client.hexists(c, "attempt") for c in claims]):  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            proxy.hang()
            resent = [await again.submit(job) for job in jobs]
            await gw.usage_rows(calls, timeout=30)
            await proxy.up()
            firsts = await asyncio.gather(*(h.result(timeout=60) for h in sent))
            seconds = await asyncio.gather(*(h.result(timeout=60) for h in resent))
            assert {r.status for r in firsts} == {"ok"}
            assert all(r.status == "ok" or r.error.code == "already_answered" for r in seconds)
            assert gw.mock.stats.calls == calls

            # Expect the ledger, without a reconciliation, to hold what the usage rows do
            rows = await gw.usage_rows(calls)
            assert len(rows) == calls
            spent = sum((row["cost_usd"] for row in rows), Decimal(0))
            assert await ledger_spent(redis_client, keys, "alpha", month) == spent
            # and a job the budget holds by them served at once, neither refused nor held
            assert (await first.chat("gpt-4o-mini", HELLO, timeout=15)).status == "ok"


async def test_a_client_opening_while_the_gateways_redis_is_away_is_told_redis_in_one_line(
    settings: Settings,
) -> None:
    # Given a worker whose Redis, which counts each team's reply queues, is away
    async with TcpProxy(settings.redis_url) as proxy:
        s = settings.model_copy(update={"redis_url": proxy.url, "redis_timeout": TIMEOUT})
        async with running_gateway(s) as gw:
            for hung in (False, True):
                if hung:
                    proxy.hang()
                else:
                    await proxy.down()
                # When a client opens (asking the gateway for its reply queue)
                with pytest.raises(ServiceUnavailable) as refused:
                    async with gw.client("alpha"):
                        pass
                # Expect one line naming Redis and what to do, not the workers
                message = str(refused.value)
                assert "the gateway's Redis is unavailable" in message, message
                assert "try again once it answers" in message and "\n" not in message
                # while a publish-only client, which needs no reply queue, opens
                async with gw.client("alpha", listen=False) as publisher:
                    assert publisher.team == "alpha"
                await proxy.up()
            # and a client opens as soon as Redis answers again
            async with gw.client("alpha") as client:
                assert (await client.chat("gpt-4o-mini", HELLO, timeout=30)).status == "ok"


async def test_submit_says_redis_when_the_workers_redis_hangs(settings: Settings) -> None:
    # Given a worker whose Redis hangs
    async with TcpProxy(settings.redis_url) as proxy:
        s = settings.model_copy(update={"redis_url": proxy.url, "redis_timeout": TIMEOUT})
        async with running_gateway(s):
            proxy.hang()
            # When an operator submits a job from the command line, its own Redis the hung
            # one, then one it reaches
            started = time.monotonic()
            hung = await _submit(settings, "--timeout", "3", QUEUEGATE_REDIS_URL=proxy.url)
            took = time.monotonic() - started
            # (its answer comes from the worker once its Redis times out, 0.3 s: the margin is
            # for a loaded machine, where 3 s once passed first)
            reached = await _submit(settings, "--timeout", "15")
            await proxy.up()
    # Expect each to fail in one line naming Redis, never the workers
    for code, stderr in (hung, reached):
        lines = stderr.strip().splitlines()
        assert code == 1 and len(lines) == 1, stderr
        assert "Redis" in lines[0] and "worker" not in lines[0].replace("workers hold", ""), lines
    assert f"Redis is not reachable at {proxy.url}" in hung[1]
    assert hung[1].strip().endswith("nothing was sent"), hung
    # within its --timeout and the 2 s it asks Redis (its client would take 4 x its Redis
    # timeout to give up opening), a process start and a busy machine aside
    assert took < 3 + 2 + 10, took
    assert "the gateway's Redis is unavailable" in reached[1]


async def test_submit_says_redis_when_its_job_waits_on_a_redis_that_hangs(
    settings: Settings,
) -> None:
    # Given a limited team, and a worker whose Redis hangs once it claims a job (the client
    # opened)
    await register(settings, "alpha", TeamConfig(rpm=1000))
    async with TcpProxy(settings.redis_url) as proxy:
        s = settings.model_copy(
            update={"redis_url": proxy.url, "redis_timeout": TIMEOUT, "shutdown_grace": 0.5}
        )
        async with running_gateway(s) as gw:
            proxy.hold_replies_after(f"{settings.redis_prefix}:claim:alpha:".encode())
            # When an operator submits a job whose answer does not come within its timeout
            code, stderr = await _submit(settings, "--timeout", "3", QUEUEGATE_REDIS_URL=proxy.url)
            # Expect the job to have reached the worker, uncalled, held for Redis
            assert proxy.held.is_set()
            assert gw.mock.stats.calls == 0
    # and the command to say Redis, in one line, not the workers
    lines = stderr.strip().splitlines()
    assert code == 1 and len(lines) == 1, stderr
    assert f"Redis is not reachable at {proxy.url}" in lines[0]
    assert lines[0].endswith("the job waits in its queue until it answers"), lines


async def _submit(settings: Settings, *args: str, **env: str) -> tuple[int, str]:
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", "submit", "--team", "alpha", "Hi", *args,
        env={
            **os.environ,
            "QUEUEGATE_NAMESPACE": settings.namespace,
            "QUEUEGATE_DATABASE_SCHEMA": settings.database_schema,
            "COLUMNS": "500",  # one line however long
            **env,
        },
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(cli.communicate(), timeout=60)
    assert cli.returncode is not None
    return cli.returncode, stderr.decode()
