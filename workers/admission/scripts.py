"""The admission Lua scripts, shipped as package data and registered once per Redis client."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from importlib import resources
from typing import Literal, NamedTuple

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

_SCRIPTS = ("take", "spend")


@cache
def _source(name: str) -> str:
    return resources.files("workers.admission").joinpath(f"lua/{name}.lua").read_text("utf-8")


def _batch_source() -> str:
    """``batch.lua`` behind each script wrapped as a local function of its KEYS and ARGV."""
    functions = "".join(
        f"local function {name}(KEYS, ARGV)\n{_source(name)}\nend\n" for name in _SCRIPTS
    )
    return functions + _source("batch")


class Call(NamedTuple):
    """One call of ``lua/take.lua`` (token buckets) or ``lua/spend.lua`` (budgets)."""

    script: Literal["take", "spend"]
    keys: list[str]
    args: list[str | int]


class Scripts:
    """Runs calls of the admission scripts by EVALSHA, one or several per round trip.

    redis-py loads the script again by itself when the server has forgotten it (a restart).
    """

    def __init__(self, client: aioredis.Redis) -> None:
        self._batch: AsyncScript = client.register_script(_batch_source())

    async def run(self, call: Call) -> list[int]:
        """The call's reply."""
        [reply] = await self.run_all([call])
        return reply

    async def run_all(self, calls: Sequence[Call]) -> list[list[int]]:
        """The replies of ``calls``, run in order in one round trip, up to and including the
        first that refuses (a reply starting with a negative status)."""
        keys = [key for call in calls for key in call.keys]
        args: list[str | int] = []
        for call in calls:
            args += [call.script, len(call.keys), len(call.args), *call.args]
        replies: list[list[int]] = await self._batch(keys=keys, args=args)
        return replies
