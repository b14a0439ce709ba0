"""The pooled Redis client: commands past its connections wait for one instead of failing."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pytest
import redis.asyncio.connection
from pydantic import ValidationError
from redis.asyncio.connection import Connection
from redis.exceptions import DataError
from redis.exceptions import TimeoutError as RedisTimeoutError

from queuegate.redis_client import CONNECTIONS, RETRIES, command_bound, redis_for
from queuegate.settings import Settings
from tests.proxy import TcpProxy


async def test_more_commands_at_once_than_connections_all_succeed(settings: Settings) -> None:
    # More than redis-py's default pool allows (100), which raised MaxConnectionsError.
    at_once = 4 * CONNECTIONS
    key = f"{settings.redis_prefix}:pooled"
    client = redis_for(settings)
    try:
        await client.set(key, "v", ex=60)
        values = await asyncio.gather(*(client.get(key) for _ in range(at_once)))
    finally:
        await client.delete(key)
        await client.aclose()
    assert values == [b"v"] * at_once


async def test_a_command_behind_busy_connections_waits_for_one(settings: Settings) -> None:
    # Given every connection busy for longer than the old 5 s wait for one, with commands
    # Redis answers (each blocks 3.5 s on an empty list; two rounds of them queue)
    key = f"{settings.redis_prefix}:busy"
    client = redis_for(settings)
    assert command_bound(settings) > 2 * 3.5
    try:
        busy = [
            asyncio.create_task(client.blpop([key], timeout=3.5)) for _ in range(2 * CONNECTIONS)
        ]
        await asyncio.sleep(0)  # the blocking commands take the connections first
        # When one more command is sent, it waits for a connection instead of failing as if
        # Redis were away (a worker would then serve its jobs unclaimed)
        assert await client.set(f"{key}:after", "v", ex=60)
        assert await asyncio.gather(*busy) == [None] * (2 * CONNECTIONS)
    finally:
        await client.delete(f"{key}:after")
        await client.aclose()


def test_sentinels_are_host_port_pairs_and_a_bad_one_is_named() -> None:
    listed = Settings(redis_sentinels="sentinel-1:26379, [::1]:26380")
    assert listed.sentinel_addresses == [("sentinel-1", 26379), ("::1", 26380)]
    with pytest.raises(ValidationError, match="'sentinel-2' is not host:port"):
        Settings(redis_sentinels="sentinel-1:26379,sentinel-2")


async def test_a_command_to_a_redis_that_hangs_fails_within_its_timeout(
    settings: Settings,
) -> None:
    # Given a client whose Redis hangs after a first answer (SIGSTOP: connections stay open)
    async with TcpProxy(settings.redis_url) as proxy:
        hung = settings.model_copy(update={"redis_url": proxy.url, "redis_timeout": 0.2})
        client = redis_for(hung)
        key = f"{settings.redis_prefix}:hung"
        try:
            await client.set(key, "0", ex=60)
            proxy.hang()
            # When a command is sent, then Redis stays silent
            bound = (RETRIES + 1) * 0.2 + 5  # every try, the backoff and a busy machine
            async with asyncio.timeout(bound):
                # Expect it to fail as Redis being unavailable, not to wait forever
                with pytest.raises(RedisTimeoutError):
                    await client.incr(key)
            # And once Redis resumes, the client carries on; the command that timed out ran
            # then (it had reached Redis), so a caller cannot tell whether it did
            await proxy.up()
            assert await client.incr(key) == 2
        finally:
            await client.delete(key)
            await client.aclose()


PACKED = [
    ("EVALSHA", "a" * 40, 2, "qg:k1", "qg:k2", 1, -3, 2.5, 10**20, b"raw", "é", ""),
    ("SCRIPT LOAD", "return 1"),  # a command of two words, which redis-py splits
    ("SET", "qg:k", memoryview(b"abc")),
    ("SET", "qg:k", bytearray(b"abc")),
]


def _connection(settings: Settings, sentinels: bool) -> Any:
    """An unopened connection of ``settings``' client, or of one through Sentinels."""
    if sentinels:
        settings = Settings(redis_sentinels="127.0.0.1:1")
    return redis_for(settings).connection_pool.make_connection()  # type: ignore[no-untyped-call]


@pytest.mark.parametrize("sentinels", [False, True])
def test_commands_are_packed_as_redis_py_packs_them(settings: Settings, sentinels: bool) -> None:
    connection = _connection(settings, sentinels)
    reference = Connection()
    for command in PACKED:
        assert b"".join(connection.pack_command(*command)) == b"".join(
            reference.pack_command(*command)
        )
    with pytest.raises(DataError, match="'bool'"):  # redis-py's own refusal, not hiredis's
        connection.pack_command("SET", "qg:k", True)


@pytest.mark.parametrize("sentinels", [False, True])
def test_packing_a_command_costs_no_python_call_per_argument(
    settings: Settings, sentinels: bool
) -> None:
    # A governed job's scripts send about 130 arguments: redis-py encoded each in Python
    # (two calls an argument), most of what its admission cost the worker.
    connection = _connection(settings, sentinels)

    def calls(arguments: int) -> int:
        count = 0

        def profile(frame: object, event: str, arg: object) -> None:
            nonlocal count
            count += event in ("call", "c_call")

        command = ("EVALSHA", "a" * 40, 1, "qg:k", *(i for i in range(arguments)))
        sys.setprofile(profile)
        try:
            connection.pack_command(*command)
        finally:
            sys.setprofile(None)
        return count

    assert calls(100) == calls(10)


async def test_a_free_connection_is_handed_out_without_the_pools_bookkeeping(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # redis-py 8 records each connection handed out and taken back, behind its condition
    # and lock, for metrics no process turns on: about half of a command's CPU, twice a job
    # one at a time.
    recorded: list[dict[str, object]] = []

    async def record(**kwargs: object) -> None:
        recorded.append(kwargs)

    monkeypatch.setattr(redis.asyncio.connection, "record_connection_count", record)
    key = f"{settings.redis_prefix}:quick"
    client = redis_for(settings)
    try:
        await client.set(key, "v", ex=60)  # the pool's first connection is made
        recorded.clear()
        values = [await client.get(key) for _ in range(3)]
        pool = client.connection_pool
        assert len(pool._available_connections) == 1  # type: ignore[attr-defined]
    finally:
        await client.delete(key)
        await client.aclose()
    assert values == [b"v"] * 3
    assert recorded == []


async def test_a_command_that_cannot_wait_for_its_socket_is_written_without_a_task(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # redis-py writes each command under asyncio.wait_for, a task of its own on Python 3.11:
    # about 20 µs of CPU a command, twice a job one at a time.
    timed: list[object] = []
    wait_for = asyncio.wait_for

    async def timing(awaitable: Any, timeout: float | None) -> Any:
        timed.append(awaitable)
        return await wait_for(awaitable, timeout)

    monkeypatch.setattr(asyncio, "wait_for", timing)
    key = f"{settings.redis_prefix}:quick-send"
    client = redis_for(settings)
    try:
        # Given an open connection with nothing unsent
        await client.set(key, "v", ex=60)
        timed.clear()
        # When short commands are sent, expect them written at once, without a timeout's task
        values = [await client.get(key) for _ in range(3)]
        assert timed == []
        # And a command longer than the transport's high-water mark, which may wait for the
        # socket, to be written under its timeout as redis-py writes it
        long = b"x" * 200_000
        await client.set(key, long, ex=60)
        assert len(timed) == 1
        assert await client.get(key) == long
    finally:
        await client.delete(key)
        await client.aclose()
    assert values == [b"v"] * 3
