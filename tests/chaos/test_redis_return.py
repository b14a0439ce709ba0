"""Chaos: a private Redis (AOF) stops while duplicates of jobs arrive, and starts again.

Every delivery misses its claim while Redis is away, and admission holds it (``fail_closed``);
once Redis answers, each job is claimed before it is called: one call per job id, every
client of a request given the one answer, and a different request under a used id never
given the other's.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path

from bench.chaos import PrivateRedis
from mockprovider import Behavior, MockConfig
from queuegate.messages import ChatResult
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from tests.chaos.harness import usage_rows
from tests.support import running_gateway, wait_until
from tests.teams import register

IDS = 8
"""Job ids, each published by three clients with the same body."""
OTHER = "dup-0"
"""The id a fourth client publishes too, with another body."""


def _hello(i: int, body: str = "hello") -> list[dict[str, str]]:
    return [{"role": "user", "content": f"job {i}: {body}"}]


def _answer(result: ChatResult) -> str:
    """The provider's answer (its response id), or the error code."""
    if result.response is not None:
        return str(result.response["id"])
    assert result.error is not None
    return result.error.code


async def test_duplicates_waiting_for_redis_are_called_once_when_it_returns(
    settings: Settings, tmp_path: Path
) -> None:
    # Given a worker on a private Redis that keeps its data (AOF), a team with a budget and
    # a rate limit (admission holds its jobs while Redis is away), and a slow provider
    persistent = ("--appendonly", "yes", "--appendfsync", "always", "--dir", str(tmp_path))
    async with PrivateRedis(*persistent) as redis:
        s = settings.model_copy(update={"redis_url": redis.url, "redis_outage": "fail_closed"})
        await register(s, "alpha", TeamConfig(rpm=100_000, budget_usd=Decimal(100)))
        mock = MockConfig(default=Behavior(latency_ms=500))
        async with (
            running_gateway(s, mock_config=mock) as gw,
            gw.client("alpha") as a,
            gw.client("alpha") as b,
            gw.client("alpha") as c,
            gw.client("alpha") as other,
        ):
            admission = gw.worker.admission
            assert admission is not None

            # When Redis stops, and each job id arrives from three clients (and one id from
            # a fourth, with another body)
            await redis.stop()
            handles = []
            for i in range(IDS):
                for client in (a, b, c):
                    job = client.job("gpt-4o-mini", _hello(i), job_id=f"dup-{i}", max_tokens=20)
                    handles.append((f"dup-{i}", "same", await client.submit(job)))
            job = other.job("gpt-4o-mini", _hello(0, "other"), job_id=OTHER, max_tokens=20)
            handles.append((OTHER, "other", await other.submit(job)))
            # ... and every delivery is held, uncalled, waiting for Redis
            await wait_until(
                lambda: gw.worker.in_flight == len(handles) and admission.outage.down, timeout=30
            )
            assert gw.mock.stats.calls == 0
            # ... and Redis starts again, with its data
            await redis.start()
            results = await asyncio.gather(
                *(h.result(timeout=60) for _, _, h in handles), return_exceptions=True
            )

            # Expect one provider call per job id
            assert gw.mock.stats.calls == IDS
            # ... every client answered
            answers: dict[tuple[str, str], set[str]] = {}
            for (job_id, body, _), result in zip(handles, results, strict=True):
                assert isinstance(result, ChatResult), (job_id, body, result)
                answers.setdefault((job_id, body), set()).add(_answer(result))
            # ... every client of a request given the same answer
            assert all(len(given) == 1 for given in answers.values()), answers
            # ... the other request under a used id never given the first's: one of the two
            # is called, the other refused
            first, second = answers[(OTHER, "same")], answers[(OTHER, "other")]
            assert first != second
            assert "idempotency_conflict" in first | second, answers
            # ... and one usage row per job id, the refusal's beside them
            assert await usage_rows(gw.pool, IDS + 1, timeout=30) == (IDS + 1, IDS + 1)
            called = await gw.pool.fetchval(
                "SELECT count(*) FROM usage_log WHERE job_id NOT LIKE '%/refused/%'"
            )
            assert called == IDS
