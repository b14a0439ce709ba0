"""Lua script calls made in one turn of the event loop go to Redis in one round trip, each
answered (or failed) as it would have been alone."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from queuegate.redis_client import redis_for
from queuegate.script_calls import MAX_CALLS, ScriptCalls
from queuegate.settings import Settings


def named_client(settings: Settings) -> tuple[aioredis.Redis, str]:
    """A client whose connections carry a name of their own, to count them in CLIENT LIST."""
    name = f"qgt-{uuid.uuid4().hex[:10]}"
    joiner = "&" if "?" in settings.redis_url else "?"
    url = f"{settings.redis_url}{joiner}client_name={name}"
    return redis_for(settings.model_copy(update={"redis_url": url})), name


async def connections_named(client: aioredis.Redis, name: str) -> int:
    return sum(1 for c in await client.client_list() if c.get("name") == name)


async def test_calls_made_at_once_share_one_connection(settings: Settings) -> None:
    # Given a script new to Redis (its first calls meet NOSCRIPT, and are run again)
    client, name = named_client(settings)
    echo = ScriptCalls.of(client).register(f"-- {uuid.uuid4().hex}\nreturn ARGV[1]")
    try:
        # When 40 calls are made in one turn, then 40 more
        first = await asyncio.gather(*(echo(keys=[], args=[f"a{i}"]) for i in range(40)))
        again = await asyncio.gather(*(echo(keys=[], args=[f"b{i}"]) for i in range(40)))
        # Expect each call its own reply, over one connection
        assert first == [f"a{i}".encode() for i in range(40)]
        assert again == [f"b{i}".encode() for i in range(40)]
        assert await connections_named(client, name) == 1
    finally:
        await client.aclose()


async def test_a_burst_goes_in_round_trips_of_max_calls(settings: Settings) -> None:
    client, name = named_client(settings)
    echo = ScriptCalls.of(client).register("return ARGV[1]")
    try:
        count = 2 * MAX_CALLS + 1
        replies = await asyncio.gather(*(echo(keys=[], args=[i]) for i in range(count)))
        assert replies == [str(i).encode() for i in range(count)]
        assert await connections_named(client, name) == 3
    finally:
        await client.aclose()


async def test_a_call_whose_script_fails_fails_alone(redis_client: aioredis.Redis) -> None:
    calls = ScriptCalls.of(redis_client)
    checked = calls.register("if ARGV[1] == 'bad' then error('refused') end return ARGV[1]")
    good, bad, other = await asyncio.gather(
        checked(keys=[], args=["good"]),
        checked(keys=[], args=["bad"]),
        checked(keys=[], args=["other"]),
        return_exceptions=True,
    )
    assert (good, other) == (b"good", b"other")
    assert isinstance(bad, ResponseError) and "refused" in str(bad)


async def test_a_failed_round_trip_fails_each_call_with_an_error_of_its_own(
    settings: Settings,
) -> None:
    # Given a client of a Redis that is not there
    gone = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    client = redis_for(gone, connect_timeout=0.5)
    echo = ScriptCalls.of(client).register("return 1")
    try:
        # When three calls are made at once
        failures = await asyncio.gather(*(echo() for _ in range(3)), return_exceptions=True)
    finally:
        await client.aclose()
    # Expect each to fail as a call alone would, with an exception of its own (raised in
    # three tasks, one would gather the tracebacks of all)
    assert all(isinstance(failure, RedisConnectionError) for failure in failures)
    assert len({id(failure) for failure in failures}) == 3


async def test_a_call_cancelled_before_its_round_trip_is_not_sent(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    key = f"{settings.redis_prefix}:cancelled"
    setter = ScriptCalls.of(redis_client).register("return redis.call('SET', KEYS[1], ARGV[1])")
    # When one call of a turn is cancelled before the turn ends, and another is not
    cancelled = setter(keys=[key], args=["cancelled"])
    kept = setter(keys=[f"{key}:kept"], args=["kept"])
    cancelled.cancel()
    try:
        assert await kept == b"OK"
        # Expect only the other sent
        assert await redis_client.get(key) is None
        assert await redis_client.get(f"{key}:kept") == b"kept"
    finally:
        await redis_client.delete(key, f"{key}:kept")


async def test_a_call_alone_is_one_evalsha_and_a_script_redis_lacks_is_loaded(
    redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # redis-py's script call costs a call alone 5-6 µs more than its EVALSHA, twice a job
    # one at a time; it is wanted only to load a script Redis lacks.
    loads: list[str] = []
    script_call = AsyncScript.__call__

    async def counted(self: AsyncScript, *args: Any, **kwargs: Any) -> Any:
        loads.append(self.sha)
        return await script_call(self, *args, **kwargs)

    monkeypatch.setattr(AsyncScript, "__call__", counted)
    # Given a script new to Redis
    echo = ScriptCalls.of(redis_client).register(f"-- {uuid.uuid4().hex}\nreturn ARGV[1]")
    # When it is called alone, twice
    first = await echo(keys=[], args=["first"])
    second = await echo(keys=[], args=["second"])
    # Expect each answered, redis-py's call made only to load it the first time
    assert (first, second) == (b"first", b"second")
    assert loads == [echo.script.sha]
