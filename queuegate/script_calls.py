"""Lua script calls made in one turn of the event loop, sent to Redis in one round trip.

A worker runs three or more scripts a job (its claim, the call's record, the outcome's store),
each through redis-py alone: a connection from the pool, a ``write`` and a wake-up for its
reply, about a fifth of the worker's CPU under load. Jobs that reach their next script in the
same turn (deliveries read together, answers that came in together) send theirs here as one
pipeline instead: one connection, one write, one read for them all::

    turns = ScriptCalls.of(client)
    claim = turns.register(lua_source("workers", "claim"))
    reply = await claim(keys=[key], args=[owner])  # sent with the turn's other calls

Each script still runs atomically on its own; only the round trip is shared. A pipeline
that fails as a whole (Redis unreachable, a timeout after the client's retries) fails each
of its calls with a copy of its error, as each alone would have failed; a call whose script
raises fails alone.
"""

from __future__ import annotations

import asyncio
import copy
import weakref
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

MAX_CALLS = 128
"""Calls in one pipeline at most: a burst (thousands of jobs delivered at once) goes in
several round trips side by side, not one whose replies all wait for its last."""

_Pending = tuple[AsyncScript, Sequence[Any], int, "asyncio.Future[Any]"]

_OF: weakref.WeakKeyDictionary[aioredis.Redis, ScriptCalls] = weakref.WeakKeyDictionary()


class ScriptCalls:
    """One Redis client's script calls of the current turn, sent together at the next."""

    __slots__ = ("__weakref__", "_client", "_pending", "_sending")

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._pending: list[_Pending] = []
        self._sending: set[asyncio.Task[None]] = set()
        """Round trips under way: referenced so that none is collected before it is done."""

    @classmethod
    def of(cls, client: aioredis.Redis) -> ScriptCalls:
        """The client's one instance, so every caller's calls share its round trips."""
        calls = _OF.get(client)
        if calls is None:
            calls = _OF[client] = cls(client)
        return calls

    def register(self, source: str) -> TurnScript:
        return TurnScript(self, self._client.register_script(source))

    def call(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """The future of one call's reply, sent with the turn's others."""
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Any] = loop.create_future()
        if not self._pending:
            # At the next turn: after every task ready in this one has made its calls.
            loop.call_soon(self._send)
        self._pending.append((script, [*keys, *args], len(keys), reply))
        return reply

    def _send(self) -> None:
        # A call whose caller was cancelled before it left is not sent, as redis-py's alone
        # would not have been.
        pending = [call for call in self._pending if not call[3].done()]
        self._pending = []
        for start in range(0, len(pending), MAX_CALLS):
            task = asyncio.ensure_future(self._run(pending[start : start + MAX_CALLS]))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _run(self, calls: list[_Pending]) -> None:
        try:
            replies = await self._replies(calls)
        except Exception as exc:
            for _, _, _, reply in calls:
                if not reply.done():
                    # One each: an exception raised in hundreds of jobs would gather all of
                    # their tracebacks.
                    reply.set_exception(_own(exc))
            return
        except BaseException:
            for _, _, _, reply in calls:
                reply.cancel()  # does nothing to a future already done (its caller's cancel)
            raise
        for (_, _, _, reply), answer in zip(calls, replies, strict=True):
            if reply.done():
                continue
            if isinstance(answer, Exception):
                reply.set_exception(answer)
            else:
                reply.set_result(answer)

    async def _replies(self, calls: list[_Pending]) -> list[Any]:
        if len(calls) == 1:
            script, keys_args, count, _ = calls[0]
            try:
                # EVALSHA itself, as below: redis-py's script call adds two imports, its
                # arguments copied twice and two calls more (twice a job one at a time).
                reply = self._client.execute_command("EVALSHA", script.sha, count, *keys_args)  # type: ignore[no-untyped-call]
                return [await reply]
            except NoScriptError:
                # Redis forgot the script (a restart): its own call loads it and runs again.
                return [await script(keys=keys_args[:count], args=keys_args[count:])]
        async with self._client.pipeline(transaction=False) as pipe:
            for script, keys_args, count, _ in calls:
                # EVALSHA itself: a script registered with the pipeline would make it ask
                # SCRIPT EXISTS first, a round trip more every time.
                pipe.execute_command("EVALSHA", script.sha, count, *keys_args)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        for i, answer in enumerate(replies):
            if isinstance(answer, NoScriptError):
                # Redis forgot the script (a restart): its own call loads it and runs again.
                script, keys_args, count, _ = calls[i]
                try:
                    replies[i] = await script(keys=keys_args[:count], args=keys_args[count:])
                except Exception as exc:
                    replies[i] = exc
        return replies


def _own(exc: Exception) -> Exception:
    """A copy of ``exc`` for one caller, caused by it; ``exc`` itself if it cannot be copied."""
    try:
        own = copy.copy(exc)
    except Exception:
        return exc
    own.__cause__ = exc
    return own


class TurnScript:
    """A registered Lua script whose calls share their turn's round trip (``ScriptCalls``);
    with ``client`` (a pipeline of the caller's own), a call goes there as redis-py's would."""

    __slots__ = ("_calls", "script")

    def __init__(self, calls: ScriptCalls, script: AsyncScript) -> None:
        self._calls = calls
        self.script = script

    def __call__(
        self,
        keys: Sequence[Any] = (),
        args: Sequence[Any] = (),
        client: aioredis.Redis | None = None,
    ) -> Any:
        if client is not None:
            return self.script(keys=keys, args=args, client=client)
        return self._calls.call(self.script, keys, args)
