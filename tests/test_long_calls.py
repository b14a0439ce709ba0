"""A job's provider calls are bounded below the broker's consumer timeout."""

from __future__ import annotations

import time

from mockprovider import Behavior, MockConfig
from queuegate.settings import Settings
from tests.support import running_gateway

HELLO = [{"role": "user", "content": "Hello there"}]


async def test_a_call_longer_than_the_job_time_limit_is_cut_and_answered(
    settings: Settings,
) -> None:
    # Given a worker that spends at most 0.5 s on a job, and a provider taking 5 s
    bounded = settings.model_copy(update={"job_time_limit": 0.5})
    slow = MockConfig(default=Behavior(latency_ms=5000))
    async with running_gateway(bounded, mock_config=slow) as gw, gw.client("alpha") as client:
        # When a job without a deadline of its own is served
        started = time.monotonic()
        result = await client.chat("gpt-4o-mini", HELLO, timeout=10)

        # Expect it answered deadline_exceeded at the bound, not when the provider is done
        assert time.monotonic() - started < 3
        assert result.error is not None and result.error.code == "deadline_exceeded"
        [attempt] = result.gateway.attempts
        assert attempt.error == "timeout"
        [row] = await gw.usage_rows(1)
        assert row["error_code"] == "deadline_exceeded"
