"""Registry change notifications: each schema's go on a channel of its own, so gateways that
share a database in different schemas never wake each other's listeners."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from queuegate.db import create_pool
from queuegate.registry import TeamConfig, set_team_config
from queuegate.registry_changes import RegistryChanges
from queuegate.settings import Settings
from tests.proxy import TcpProxy
from tests.teams import register


class Told:
    """A listener's ``on_change``: what it was told (``None``: it started listening)."""

    def __init__(self) -> None:
        self.teams: list[str | None] = []
        self._events: defaultdict[str | None, asyncio.Event] = defaultdict(asyncio.Event)

    def __call__(self, team: str | None) -> None:
        self.teams.append(team)
        self._events[team].set()

    async def of(self, team: str | None) -> None:
        """Wait until it is told of ``team``."""
        async with asyncio.timeout(10):
            await self._events[team].wait()


@asynccontextmanager
async def _schema(settings: Settings, schema: str, team: str) -> AsyncIterator[Settings]:
    """``settings`` in ``schema`` with ``team`` registered there; the schema dropped after."""
    s = settings.model_copy(update={"database_schema": schema})
    await register(s, team, TeamConfig())
    try:
        yield s
    finally:
        pool = await create_pool(settings)
        try:
            await pool.execute(f'DROP SCHEMA "{schema}" CASCADE')
        finally:
            await pool.close()


async def _change(settings: Settings, team: str, rpm: int) -> None:
    pool = await create_pool(settings)
    try:
        assert await set_team_config(pool, team, TeamConfig(rpm=rpm))
    finally:
        await pool.close()


async def test_a_change_in_one_schema_is_never_sent_to_another_schemas_listener(
    settings: Settings,
) -> None:
    # Given two gateways' schemas on one database, gamma a team of the first, beta of the
    # second, and a listener for each: the second's through a proxy that watches for gamma
    base = settings.database_schema
    async with (
        _schema(settings, f"{base}_one", "gamma") as one,
        _schema(settings, f"{base}_two", "beta") as two,
        TcpProxy(settings.database_url) as proxy,
    ):
        told_one, told_two = Told(), Told()
        through = two.model_copy(update={"database_url": proxy.url})
        async with RegistryChanges(one, told_one), RegistryChanges(through, told_two):
            await told_one.of(None)
            await told_two.of(None)
            proxy.watch(b"gamma")

            # When gamma's config changes, then beta's (PostgreSQL tells a listener of
            # changes in the order they commit)
            await _change(one, "gamma", 100)
            await told_one.of("gamma")
            await _change(two, "beta", 200)
            await told_two.of("beta")

            # Expect each listener told of its own schema's change alone, and not one byte
            # naming gamma sent to the second's connection
            assert told_one.teams == [None, "gamma"]
            assert told_two.teams == [None, "beta"]
            assert proxy.seen == 0


async def test_a_schema_whose_channel_name_would_be_too_long_is_told_its_changes(
    settings: Settings,
) -> None:
    # Given a schema of the longest name a schema may have (63 bytes) and a listener for it
    long = settings.database_schema.ljust(63, "x")
    async with _schema(settings, long, "gamma") as s:
        told = Told()
        async with RegistryChanges(s, told):
            await told.of(None)

            # When gamma's config changes
            await _change(s, "gamma", 100)

            # Expect the listener told
            await told.of("gamma")
            assert told.teams == [None, "gamma"]
