"""A worker SIGKILLed holding budget reservations does not stall the jobs those hold: once its
claims lapse, its reservations end, each kept as spend at its estimate (what its lost call is
billed), so the jobs waiting on them are served or refused at once, though its jobs'
redeliveries (which would end them) are queued behind the waiting jobs; and its jobs'
redeliveries, whose entries in the ledger (their own) hold the budget, reserve in place of
them rather than wait behind jobs waiting on them."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal

import asyncpg
import redis.asyncio as aioredis

from mockprovider import Behavior, MockConfig, MockProvider
from producer import GatewayClient, JobHandle
from queuegate.broker import connect
from queuegate.db import create_pool
from queuegate.keys import Keys
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from queuegate.spend import current_month
from queuegate.topology import Topology
from tests.chaos.harness import (
    collect,
    declare_teams,
    start_worker,
    stop_workers,
    usage_rows,
    worker_env,
)
from tests.support import running_accountant
from tests.teams import register

BUDGET = Decimal("0.05")
"""Three jobs' reservations (4,000 tokens each at the dearest fallback's price, about
$0.016), not four; what the jobs really cost is a thousandth of it."""
HELD = 3
"""The killed worker's jobs: its prefetch, each with its reservation open."""
WAITING = 2
"""The surviving worker's prefetch, filled with jobs waiting on those reservations."""


async def _reservations(client: aioredis.Redis, ledger: str) -> int:
    """The open reservations in ``ledger``."""
    return sum(field.startswith(b"r:") for field in await client.hkeys(ledger))


async def _queue(settings: Settings) -> tuple[int, int]:
    """Team alpha's queue: its messages ready, and its consumers."""
    connection = await connect(settings.amqp_url, name="chaos-dead-reservations")
    async with connection:
        channel = await connection.channel()
        underlay = await channel.get_underlay_channel()
        declared = await underlay.queue_declare(
            Topology.of(settings).team_queue("alpha"), passive=True
        )
        return int(declared.message_count or 0), int(declared.consumer_count or 0)


@dataclass
class Held:
    """Team alpha's budget held by the reservations of a worker's hung calls."""

    mock: MockProvider
    env: dict[str, str]
    killed: asyncio.subprocess.Process
    workers: list[asyncio.subprocess.Process]
    pool: asyncpg.Pool
    client: GatewayClient
    handles: list[JobHandle]

    async def submit(self, text: str) -> None:
        content = [{"role": "user", "content": text}]
        job = self.client.job("gpt-4o-mini", content, max_tokens=4000)
        self.handles.append(await self.client.submit(job))

    async def kill(self) -> None:
        """The provider answers at once from now on, and the worker holding the
        reservations is killed."""
        self.mock.configure(MockConfig(default=Behavior(latency_ms=50)))
        self.killed.send_signal(signal.SIGKILL)
        await self.killed.wait()

    async def expect_each_served_once(self, *, or_refused: bool = False) -> None:
        """Every job served well inside the maximum wait (none refused; ``or_refused``: or
        refused ``budget_exhausted``, none held to the wait's end), each called once at most
        besides the killed worker's hung calls, within the budget."""
        handles = self.handles
        results = await collect(handles, timeout=15)
        codes = [r.status if r.status == "ok" else r.error.code for r in results]
        if or_refused:
            assert set(codes) <= {"ok", "budget_exhausted"} and "ok" in codes, codes
        else:
            assert codes == ["ok"] * len(handles), codes
        assert codes.count("ok") <= self.mock.stats.calls <= len(handles) + HELD
        assert await usage_rows(self.pool, len(handles), timeout=30) == (len(handles),) * 2
        assert await self.pool.fetchval("SELECT sum(cost_usd) FROM usage_log") <= BUDGET


@asynccontextmanager
async def held_budget(
    settings: Settings, redis_client: aioredis.Redis, max_wait: int
) -> AsyncIterator[Held]:
    """Team alpha with a budget three jobs' reservations fill, claims leased for 1 s, and a
    worker whose three jobs' calls hang, their reservations open."""
    await register(settings, "alpha", TeamConfig(budget_usd=BUDGET))
    ledger = Keys(settings.redis_prefix).spend("alpha", current_month())
    async with MockProvider(MockConfig(default=Behavior(latency_ms=60_000))) as mock:
        await declare_teams(settings, ("alpha",))
        short = {"QUEUEGATE_CLAIM_LEASE": "1", "QUEUEGATE_ADMISSION_MAX_WAIT": str(max_wait)}
        env = worker_env(settings, mock, **short)
        killed = await start_worker({**env, "QUEUEGATE_PREFETCH": str(HELD)}, ("alpha",))
        workers = [killed]
        pool = await create_pool(settings)
        try:
            async with (
                running_accountant(settings),
                GatewayClient(settings, team="alpha") as client,
            ):
                held = Held(mock, env, killed, workers, pool, client, [])
                for i in range(HELD):
                    await held.submit(f"held {i}")
                async with asyncio.timeout(30):
                    # Polled: the reservations are made unannounced.
                    while await _reservations(redis_client, ledger) < HELD:  # noqa: ASYNC110
                        await asyncio.sleep(0.05)
                yield held
        finally:
            await stop_workers(workers)
            await pool.close()


async def test_a_killed_workers_reservations_stop_holding_once_its_claims_lapse(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given team alpha's budget held by a worker's hung calls' reservations
    async with held_budget(settings, redis_client, max_wait=20) as held:
        # ... and another worker whose slots fill with jobs waiting on them
        held.workers.append(
            await start_worker({**held.env, "QUEUEGATE_PREFETCH": str(WAITING)}, ("alpha",))
        )
        async with asyncio.timeout(30):
            while (await _queue(settings))[1] < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        for i in range(WAITING + 1):
            await held.submit(f"waits {i}")
        async with asyncio.timeout(30):
            while (await _queue(settings))[0] > 1:  # noqa: ASYNC110
                await asyncio.sleep(0.05)

        # When the first worker is killed (its jobs go back to the queue, behind the waiting
        # ones) and the provider answers at once from then on
        await held.kill()

        # Expect every job served once or refused at once, none held to the wait's end, within
        # the budget: its lost calls, billed at their estimates, leave no room for most
        await held.expect_each_served_once(or_refused=True)


async def test_redelivered_jobs_whose_reservations_hold_the_budget_do_not_wait_for_each_other(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given team alpha's budget held by a worker's hung calls' reservations
    async with held_budget(settings, redis_client, max_wait=30) as held:
        # When it is killed, the provider answers at once from then on, and a new worker takes
        # its jobs over (their claims, with their lost calls, and their entries in the ledger)
        # along with fresh jobs, which wait for those entries
        await held.kill()
        for i in range(WAITING):
            await held.submit(f"fresh {i}")
        held.workers.append(
            await start_worker({**held.env, "QUEUEGATE_PREFETCH": str(HELD + WAITING)}, ("alpha",))
        )

        # Expect every job served once, none refused, within the budget
        await held.expect_each_served_once()
