"""A Redis that turns to evicting keys while workers run on it: said, and shown as a metric.

A worker refuses to start on such a Redis (``cli.roles``); one whose ``maxmemory`` or
``maxmemory-policy`` is set while the worker runs (``CONFIG SET``, a managed Redis's settings
changed) went unseen until a job whose claim or stored outcome it evicted was called again.
"""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError, RedisError

from queuegate.metrics import set_redis_evicts_keys
from queuegate.redis_client import evicting, eviction_policy
from queuegate.runtime import until_set

log = logging.getLogger(__name__)

EVICTION_CHECK_EVERY = 60.0
"""Seconds between a worker's questions of its Redis's policy: a policy is changed by hand,
rarely, and one INFO a minute costs nothing."""


async def watch_eviction(redis: aioredis.Redis, place: str, stop: asyncio.Event) -> None:
    """Ask the Redis at ``place`` (``redis_place``) whether it evicts keys once full, at once
    and then every ``EVICTION_CHECK_EVERY`` seconds until ``stop``: while it does, an error
    line each time and ``queuegate_redis_evicts_keys`` at 1; a line when it no longer does.
    Asked no more of a Redis that refuses INFO (a managed one may); a question unanswered is
    left for the next (an outage is said where the jobs' commands fail)."""
    evicts = False
    while not stop.is_set():
        try:
            policy = await eviction_policy(redis)
        except NoPermissionError:
            return
        except (RedisError, OSError, TimeoutError):
            policy = "" if evicts else None  # not known: held as it was, said no more
        if policy:
            log.error("%s", evicting(place, policy))
        elif policy is None and evicts:
            log.info("%s no longer evicts keys", place)
        evicts = policy is not None
        set_redis_evicts_keys(evicts)
        await until_set(EVICTION_CHECK_EVERY, stop)
