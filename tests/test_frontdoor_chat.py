"""The HTTP front door, end to end: the official openai SDK against a real uvicorn server,
in front of a real worker, accounting and the mock provider."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import openai
import pytest

from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from router import load_catalog
from tests.frontdoor_support import FrontDoorUrl, issue_key, running_frontdoor
from tests.support import Gateway, running_gateway
from tests.teams import register

HELLO = [{"role": "user", "content": "Hello there"}]


@dataclass(frozen=True)
class Door:
    gateway: Gateway
    url: FrontDoorUrl
    keys: dict[str, str]

    def client(self, team: str = "alpha", **kwargs: object) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=self.url.v1, api_key=self.keys[team], max_retries=0, **kwargs
        )  # type: ignore[arg-type]


@pytest.fixture
async def door(settings: Settings) -> AsyncIterator[Door]:
    for team in ("alpha", "beta"):
        await register(settings, team, TeamConfig())
    keys = {team: await issue_key(settings, team) for team in ("alpha", "beta")}
    async with running_gateway(settings, teams=("alpha", "beta")) as gateway:
        catalog = load_catalog(None, {"QUEUEGATE_MOCK_URL": gateway.mock.url})
        async with running_frontdoor(settings, catalog) as url:
            yield Door(gateway, url, keys)


async def test_a_chat_completion_goes_through_the_queue_and_back(door: Door) -> None:
    async with door.client() as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=HELLO, max_tokens=20
        )
    completion = raw.parse()
    assert completion.choices[0].message.content
    job_id = raw.headers["x-queuegate-job-id"]
    assert raw.headers["x-request-id"] == job_id
    assert float(raw.headers["x-queuegate-cost-usd"]) > 0
    [row] = await door.gateway.usage_rows(1)
    assert row["job_id"] == job_id and row["team"] == "alpha"
    assert row["identity"].startswith("frontdoor:guest/api_key:")


async def test_a_missing_or_unknown_key_is_refused_401_and_nothing_is_published(
    door: Door,
) -> None:
    unknown = openai.AsyncOpenAI(
        base_url=door.url.v1, api_key="qg_000000000000_" + "x" * 43, max_retries=0
    )
    async with unknown:
        with pytest.raises(openai.AuthenticationError) as refused:
            await unknown.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert refused.value.code == "unauthorized"
    assert door.gateway.mock.stats.calls == 0
