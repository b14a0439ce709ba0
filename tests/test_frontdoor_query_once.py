"""A query parameter a route reads as one value, given twice, is refused 400 in the API's own
error shape naming it, never answered as though its last value were all that was asked;
sent by the official SDKs to a real front door. (The SDKs send a list as ``name[]=``: the
repeat is written in the path, as a hand-written URL has it.)"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import anthropic
import fastapi
import fastapi.routing
import openai
import pytest

from admin.keys import issue_admin_key
from frontdoor.query_once import single_valued
from queuegate.settings import Settings
from tests.frontdoor_support import Door, open_door

REPEATED = [
    ("/admin/usage?month=2026-11&month=2026-12", "month", 2),
    ("/admin/usage?model=gpt-4o-mini&model=claude-haiku", "model", 2),
    ("/admin/usage?status=ok&status=error", "status", 2),
    ("/admin/audit-log?limit=5&limit=10", "limit", 2),
    ("/admin/audit-log?cursor=1-1&cursor=2-2", "cursor", 2),
    ("/admin/audit-log?team=alpha&team=alpha", "team", 2),
    ("/v1/files?purpose=batch&purpose=batch_output", "purpose", 2),
    ("/v1/files?order=asc&order=desc", "order", 2),
    ("/v1/batches?limit=1&limit=2&limit=3", "limit", 3),
    ("/v1/batches?after=batch_a&after=batch_b", "after", 2),
    ("/v1/jobs/job-1?wait=0&wait=1", "wait", 2),
]
"""Team-key requests to the admin and OpenAI routes, each repeating a parameter it reads as
one value, and the parameter and times."""


def said(error: openai.APIStatusError) -> tuple[object, object, object]:
    """An OpenAI-shaped refusal's code, param and message, as the body has them."""
    body = error.body
    assert isinstance(body, dict), error
    return body["code"], body["param"], body["message"]


@pytest.fixture
async def door(settings: Settings) -> AsyncIterator[Door]:
    async with open_door(settings) as opened:
        yield opened


async def test_an_admin_key_naming_two_teams_is_refused_not_answered_the_last(
    door: Door,
) -> None:
    admin_key = (await issue_admin_key(door.gateway.pool, "ops")).key
    async with openai.AsyncOpenAI(base_url=door.url, api_key=admin_key, max_retries=0) as admin:
        # When an admin key asks for the usage of alpha and of beta in one request
        with pytest.raises(openai.BadRequestError) as refused:
            await admin.get("/admin/usage?team=alpha&team=beta", cast_to=object)
        # and of beta alone
        beta = await admin.get("/admin/usage?team=beta", cast_to=object)

    # Expect the first refused, naming team and saying what to do; the second answered
    assert said(refused.value) == ("invalid_request", "team", "team given 2 times: give it once")
    assert isinstance(beta, dict) and beta["team"] == "beta"


async def test_every_route_refuses_a_repeated_parameter_in_its_own_error_shape(
    door: Door,
) -> None:
    key = door.keys["alpha"]
    async with (
        openai.AsyncOpenAI(base_url=door.url, api_key=key, max_retries=0) as client,
        anthropic.AsyncAnthropic(base_url=door.url, api_key=key, max_retries=0) as claude,
    ):
        # When a team's key repeats a parameter each route reads as one value
        refusals = []
        for path, _, _ in REPEATED:
            with pytest.raises(openai.BadRequestError) as refused:
                await client.get(path, cast_to=object)
            refusals.append(refused.value)
        with pytest.raises(anthropic.BadRequestError) as claude_refused:
            await claude.get("/v1/messages/batches?limit=1&limit=2", cast_to=object)
        # and repeats a parameter no route reads, beside one given once
        listed = await client.get("/v1/batches?limit=1&foo=1&foo=2", cast_to=object)

    # Expect each refused naming the parameter and how often it came: OpenAI's shape
    for (path, name, times), error in zip(REPEATED, refusals, strict=True):
        expected = ("invalid_request", name, f"{name} given {times} times: give it once")
        assert said(error) == expected, path
    # and Anthropic's under /v1/messages
    body = claude_refused.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"] == {
        "type": "invalid_request_error",
        "message": "invalid_request: limit given 2 times: give it once",
    }
    # and a parameter no route reads left unread, as before
    assert isinstance(listed, dict) and listed["data"] == []


def test_a_parameter_declared_as_a_list_may_repeat() -> None:
    # Given a route reading tag as a list and limit as one value
    router = fastapi.APIRouter()

    @router.get("/things")
    async def things(
        tag: Annotated[list[str] | None, fastapi.Query()] = None, limit: int = 1
    ) -> None:
        """Read nothing: only its declaration is looked at."""

    # Expect limit alone held to one value
    (route,) = router.routes
    assert isinstance(route, fastapi.routing.APIRoute)
    assert single_valued(route) == {"limit"}
