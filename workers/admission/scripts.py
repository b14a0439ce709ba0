"""The admission Lua scripts, shipped as package data and registered once per Redis client,
with the claim's (``workers/lua``) that ride in the same round trips: a job's claim with its
budget reservation and first take of its team's buckets, its first take of a deployment's
buckets with the record of its call, its settles with its outcome's store."""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple, cast

import redis.asyncio as aioredis

from queuegate.keys import Keys
from queuegate.redis_client import lua_source
from queuegate.script_calls import ScriptCalls

_SCRIPTS = (("workers.admission", "take"), ("workers.admission", "spend"))
_CLAIM_SCRIPTS = (("workers", "claim"), ("workers", "hold"), ("workers", "finish"))
ONCE_MS = 30_000
"""Milliseconds a round trip's replies are kept so that, sent again, it is not run again
(``lua/batch.lua``): the Redis client's own resends come within ``RETRIES`` times the Redis
timeout (at most 7 s: ``Settings.redis_timeout``) and the backoff, and a caller that tries
again after an error (passing the same ``once``) within a Sentinel failover's time."""


def _batch_source() -> str:
    """``batch.lua`` behind each script wrapped as a local function of its KEYS and ARGV, and
    of the round trip's TIME as ``...`` (which a script run on its own finds empty)."""
    functions = "".join(
        f"local function {name}(KEYS, ARGV, ...)\n{lua_source(package, name)}\nend\n"
        for package, name in (*_SCRIPTS, *_CLAIM_SCRIPTS)
    )
    return functions + lua_source("workers.admission", "batch")


class Call(NamedTuple):
    """One call of ``lua/take.lua`` (token buckets), ``lua/spend.lua`` (budgets), or of the
    claim's ``claim.lua``, ``hold.lua`` or ``finish.lua`` (``workers/lua``)."""

    script: Literal["take", "spend", "claim", "hold", "finish"]
    keys: list[str]
    args: list[str | int]


class _Names:
    """Round trip names unique across processes and restarts without a random draw each (a
    system call, three a governed job): a random prefix per process, then a counter."""

    def __init__(self) -> None:
        self.renew()
        # A child forked after the first name would count on from its parent's.
        os.register_at_fork(after_in_child=self.renew)

    def renew(self) -> None:
        self._prefix = secrets.token_hex(12)
        self._count = itertools.count()

    def next(self) -> str:
        # The prefix is of a fixed length: no two (prefix, count) pairs make the same name.
        return f"{self._prefix}{next(self._count):x}"


_NAMES = _Names()


def once() -> str:
    """A new round trip's name, for ``Scripts.run_all``."""
    return _NAMES.next()


class Scripts:
    """Runs calls of the admission scripts by EVALSHA, one or several per round trip, each
    round trip once however often it is sent.

    redis-py loads the script again by itself when the server has forgotten it (a restart).
    """

    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self._batch = ScriptCalls.of(client).register(_batch_source())
        self._keys = keys

    async def run(self, call: Call, *, name: str | None = None) -> list[int]:
        """The call's reply."""
        [reply] = await self.run_all([call], name=name)
        return cast(list[int], reply)

    async def run_all(
        self, calls: Sequence[Call], *, name: str | None = None, repeatable: bool = False
    ) -> list[Any]:
        """The replies of ``calls``, run in order in one round trip, up to and including the
        first that refuses (a reply starting with a negative status, a take not taken, or a
        claim not won).

        ``name`` (from ``once()``) names the round trip: one sent again under the same name
        within ``ONCE_MS`` returns the replies of the first instead of running again, so a
        caller trying again after an error that may have come after Redis ran it passes the
        name of its first try. None: a new one (the client's own resends are covered).
        ``repeatable``: every call is safe to run twice (a claim and the record of its call),
        so no replies are kept.
        """
        keys = [self._keys.once(name or once())]
        keys += [key for call in calls for key in call.keys]
        args: list[str | int] = [0 if repeatable else ONCE_MS]
        for call in calls:
            args += [call.script, len(call.keys), len(call.args), *call.args]
        replies: list[Any] = await self._batch(keys=keys, args=args)
        return replies
