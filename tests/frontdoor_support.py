"""The HTTP front door in the test's event loop, on a free port, before a running gateway."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import openai

from frontdoor.serve import serving
from mockprovider import MockConfig
from queuegate.db import create_pool
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from queuegate.tenancy import add_api_key
from router import load_catalog
from tests.support import Gateway, running_gateway
from tests.teams import register

HELLO = [{"role": "user", "content": "Hello there"}]


async def issue_key(settings: Settings, team: str) -> tuple[str, str]:
    """A new API key of ``team`` and its id (the schema must be migrated)."""
    pool = await create_pool(settings)
    try:
        return await add_api_key(pool, team)
    finally:
        await pool.close()


@dataclass(frozen=True)
class Door:
    """A gateway with the front door before it, and a key for each team."""

    gateway: Gateway
    url: str
    keys: dict[str, str]
    key_ids: dict[str, str]

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    def client(self, team: str = "alpha", **kwargs: Any) -> openai.AsyncOpenAI:
        kwargs.setdefault("max_retries", 0)
        return openai.AsyncOpenAI(base_url=self.v1, api_key=self.keys[team], **kwargs)

    def sync_client(self, team: str = "alpha", **kwargs: Any) -> openai.OpenAI:
        """For a worker thread only: the server runs on the test's own event loop."""
        kwargs.setdefault("max_retries", 0)
        return openai.OpenAI(base_url=self.v1, api_key=self.keys[team], **kwargs)


@contextlib.asynccontextmanager
async def keyed_gateway(
    settings: Settings,
    teams: Mapping[str, TeamConfig] | None = None,
    mock_config: MockConfig | None = None,
) -> AsyncIterator[tuple[Gateway, dict[str, str], dict[str, str]]]:
    """``teams`` registered with their configs (alpha and beta by default), served by a
    gateway; with the gateway, a key of each team and the keys' ids, by team."""
    teams = teams or {"alpha": TeamConfig(), "beta": TeamConfig()}
    keys, key_ids = {}, {}
    for team, config in teams.items():
        await register(settings, team, config)
        key_ids[team], keys[team] = await issue_key(settings, team)
    async with running_gateway(settings, teams=list(teams), mock_config=mock_config) as gateway:
        yield gateway, keys, key_ids


def door_before(
    gateway: Gateway, settings: Settings
) -> contextlib.AbstractAsyncContextManager[str]:
    """The front door of ``settings`` before ``gateway``, yielding its root URL."""
    return serving(settings, load_catalog(None, {"QUEUEGATE_MOCK_URL": gateway.mock.url}))


@contextlib.asynccontextmanager
async def open_door(
    settings: Settings,
    teams: Mapping[str, TeamConfig] | None = None,
    mock_config: MockConfig | None = None,
    door_settings: Settings | None = None,
) -> AsyncIterator[Door]:
    """``teams`` registered with their configs (alpha and beta by default), each with a key,
    served by a gateway and the front door (with ``door_settings`` when given: a front door
    reaching a service through a proxy, say)."""
    async with (
        keyed_gateway(settings, teams, mock_config) as (gateway, keys, key_ids),
        door_before(gateway, door_settings or settings) as url,
    ):
        yield Door(gateway, url, keys, key_ids)
