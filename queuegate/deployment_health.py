"""A deployment's shared health as operators see it: its circuit breaker and its 429 pause.

Read from the keys every worker shares them by (router/lua/health.lua writes them), on Redis's
own clock. ``queuegate deployments``, ``queuegate status`` and the dashboard's Live page all
read it here, so they show the same state: a breaker whose hash expired reads ``closed`` in
each of them, and a deployment no running worker has called yet is listed all the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis

from queuegate.keys import Keys
from queuegate.redis_client import text


@dataclass(frozen=True)
class DeploymentHealth:
    state: str
    """``closed``, ``open`` or ``half_open`` (a probe is out)."""
    wait: float
    """Seconds until an open circuit lets a probe through, or a probe's time runs out."""
    paused_for: float
    """Seconds left of a 429 pause (0: not paused)."""


async def read_health(
    client: aioredis.Redis, keys: Keys, deployments: Sequence[str]
) -> dict[str, DeploymentHealth]:
    """The health of each deployment named, in one round trip (raises RedisError)."""
    async with client.pipeline(transaction=False) as pipe:
        pipe.time()
        for name in deployments:
            pipe.hmget(keys.breaker(name), "state", "until")
            pipe.pttl(keys.paused(name))
        (seconds, micros), *replies = await pipe.execute()
    now = int(seconds) * 1000 + int(micros) // 1000
    health = {}
    for i, name in enumerate(deployments):
        (state, until), paused = replies[2 * i], replies[2 * i + 1]
        left = max(0, int(until) - now) if until is not None else 0
        health[name] = DeploymentHealth(
            state=text(state) if state is not None else "closed",
            wait=left / 1000,
            paused_for=max(0, int(paused)) / 1000,
        )
    return health
