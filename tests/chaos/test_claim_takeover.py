"""Chaos: a worker SIGKILLed mid-call; its job is taken over once the claim's lease lapses."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from decimal import Decimal

from mockprovider import Behavior, MockConfig, MockProvider
from producer import GatewayClient
from queuegate.db import create_pool
from queuegate.settings import Settings
from tests.chaos.harness import declare_teams, usage_rows
from tests.chaos.test_worker_killed import accounting

HELLO = [{"role": "user", "content": "Hello there"}]


async def test_a_job_whose_worker_dies_mid_call_is_answered_once_and_the_lost_call_counted(
    settings: Settings,
) -> None:
    # Given a worker process whose provider never answers, with one-second claim leases
    async with MockProvider(MockConfig(default=Behavior(timeout_rate=1, hang_s=300))) as mock:
        await declare_teams(settings, ("alpha",))
        env = {
            **os.environ,
            "QUEUEGATE_NAMESPACE": settings.namespace,
            "QUEUEGATE_METRICS_PORT": "0",
            "QUEUEGATE_DATABASE_SCHEMA": settings.database_schema,
            "QUEUEGATE_CLAIM_LEASE": "1",
            "QUEUEGATE_MOCK_URL": mock.url,
            "QUEUEGATE_MOCK_KEY": "sk-test",
        }

        async def start_worker() -> asyncio.subprocess.Process:
            return await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "cli", "worker", "--teams", "alpha"),
                *("--log-level", "warning"),
                env=env,
                stderr=asyncio.subprocess.DEVNULL,
            )

        worker = await start_worker()
        pool = await create_pool(settings)
        try:
            async with accounting(settings), GatewayClient(settings, team="alpha") as client:
                handle = await client.submit(client.job("gpt-4o-mini", HELLO, max_tokens=50))
                async with asyncio.timeout(60):
                    await mock.wait_for_calls(1)
                # When the worker is killed mid-call and another starts, the provider now well
                worker.send_signal(signal.SIGKILL)
                await worker.wait()
                mock.configure(MockConfig())
                worker = await start_worker()

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
                assert Decimal(row["cost_usd"]) > result.gateway.cost_usd > 0
                assert client.duplicates == 0
        finally:
            if worker.returncode is None:
                worker.send_signal(signal.SIGTERM)
            await asyncio.wait_for(worker.wait(), timeout=30)
            await pool.close()
