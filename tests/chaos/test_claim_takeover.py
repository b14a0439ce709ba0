"""Chaos: a worker SIGKILLed mid-call; its job is taken over once the claim's lease lapses."""

from __future__ import annotations

import asyncio
import signal
from decimal import Decimal

from mockprovider import Behavior, MockConfig, MockProvider
from producer import GatewayClient
from queuegate.db import create_pool
from queuegate.settings import Settings
from tests.chaos.harness import (
    declare_teams,
    start_worker,
    stop_workers,
    usage_rows,
    worker_env,
)
from tests.support import running_accountant

HELLO = [{"role": "user", "content": "Hello there"}]


async def test_a_job_whose_worker_dies_mid_call_is_answered_once_and_the_lost_call_counted(
    settings: Settings,
) -> None:
    # Given a worker process whose provider never answers, with one-second claim leases
    async with MockProvider(MockConfig(default=Behavior(timeout_rate=1, hang_s=300))) as mock:
        await declare_teams(settings, ("alpha",))
        env = worker_env(settings, mock, QUEUEGATE_CLAIM_LEASE="1")
        worker = await start_worker(env, ("alpha",))
        pool = await create_pool(settings)
        try:
            async with (
                running_accountant(settings),
                GatewayClient(settings, team="alpha") as client,
            ):
                handle = await client.submit(client.job("gpt-4o-mini", HELLO, max_tokens=50))
                async with asyncio.timeout(60):
                    await mock.wait_for_calls(1)
                # When the worker is killed mid-call and another starts, the provider now well
                worker.send_signal(signal.SIGKILL)
                await worker.wait()
                mock.configure(MockConfig())
                worker = await start_worker(env, ("alpha",))

                # Expect the job answered once, by one more call
                result = await handle.result(timeout=60)
                assert result.status == "ok", result.error
                assert mock.stats.calls == 2
                # ... and its one usage row counting the lost call, priced at its estimate
                assert await usage_rows(pool, 1, timeout=30) == (1, 1)
                row = await pool.fetchrow("SELECT * FROM usage_log")
                attempts = row["attempt_log"]
                assert row["attempts"] == 2 and len(attempts) == 2
                assert attempts[0]["error"] == "lost" and attempts[1]["status"] == 200
                assert result.gateway is not None
                # ... the client told the row's cost
                assert Decimal(row["cost_usd"]) == result.gateway.cost_usd > 0
                assert client.duplicates == 0
        finally:
            await stop_workers([worker])
            await pool.close()
