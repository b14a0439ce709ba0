"""A worker's Redis set to evict keys while the worker runs: said, and shown as a metric."""

from __future__ import annotations

import logging

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from bench.chaos import PrivateRedis
from queuegate.settings import Settings
from tests.support import running_gateway, wait_until
from workers import eviction_watch


def _evicts() -> float | None:
    return REGISTRY.get_sample_value("queuegate_redis_evicts_keys")


async def test_a_redis_set_to_evict_keys_under_a_running_worker_is_said_and_shown(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a worker serving on a Redis of its own that keeps its keys, asked every 50 ms
    monkeypatch.setattr(eviction_watch, "EVICTION_CHECK_EVERY", 0.05)
    caplog.set_level(logging.INFO, logger=eviction_watch.__name__)
    async with PrivateRedis() as own, aioredis.Redis.from_url(own.url) as admin:
        on_own = settings.model_copy(update={"redis_url": own.url})
        async with running_gateway(on_own):
            await wait_until(lambda: _evicts() == 0)
            said = [r for r in caplog.records if r.name == eviction_watch.__name__]
            assert said == []

            # When an operator gives it a maxmemory and an evicting policy while it runs
            # (before: unseen, until a job whose stored outcome it evicted was called again)
            await admin.config_set("maxmemory", "30mb")
            await admin.config_set("maxmemory-policy", "volatile-lru")

            # Expect the metric at 1, and an error line naming the policy and what to set
            await wait_until(lambda: _evicts() == 1)
            errors = [r for r in caplog.records if r.levelno == logging.ERROR]
            assert errors, caplog.text
            line = errors[0].getMessage()
            assert (
                f"Redis at {own.url} evicts keys when full (maxmemory-policy volatile-lru)" in line
            )
            assert line.endswith("set its maxmemory-policy to noeviction")

            # When it is set back, expect the metric at 0 and a line saying so
            await admin.config_set("maxmemory-policy", "noeviction")
            await wait_until(lambda: _evicts() == 0)
            assert f"Redis at {own.url} no longer evicts keys" in caplog.text
