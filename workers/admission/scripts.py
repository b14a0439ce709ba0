"""The admission Lua scripts, shipped as package data and registered once per Redis client."""

from __future__ import annotations

from functools import cache
from importlib import resources

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript


@cache
def _source(name: str) -> str:
    return resources.files("workers.admission").joinpath(f"lua/{name}.lua").read_text("utf-8")


class Scripts:
    """``take`` (token buckets) and ``spend`` (budgets), run by EVALSHA.

    redis-py loads a script again by itself when the server has forgotten it (a restart).
    """

    def __init__(self, client: aioredis.Redis) -> None:
        self.take: AsyncScript = client.register_script(_source("take"))
        self.spend: AsyncScript = client.register_script(_source("spend"))
