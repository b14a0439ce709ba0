"""The dashboard while the front door's Redis or PostgreSQL is away (cut off by a proxy; the
shared services keep running): the Live page marks itself stale naming Redis, its data
answers a stale payload within the bound instead of a 500 or a hang, and every page a clear
503."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import openai
import pytest
from fastapi import FastAPI

from admin.keys import issue_admin_key
from frontdoor.auth import KEY_WAIT
from frontdoor.dashboard.outage import PAGE_WAIT, WAIT, Guarded
from frontdoor.serve import serving
from frontdoor.service import READY_TIMEOUT, FrontDoor
from queuegate.db import database_unreachable
from queuegate.redis_client import redis_unreachable
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from router import load_catalog
from tests.dashboard_browser import chromium, sign_in, signed_in
from tests.frontdoor_support import issue_key
from tests.proxy import TcpProxy
from tests.support import running_gateway
from tests.teams import register

ANSWERED_WITHIN = httpx.Timeout(WAIT + 3)
"""A client that gives up past the bound: a page held as long as the outage fails the test."""
PAGES = ["/dashboard", "/dashboard/live", "/dashboard/audit", "/dashboard/batches"]


@dataclass(frozen=True)
class Served:
    url: str
    admin_key: str
    proxy: TcpProxy
    settings: Settings
    """The front door's: its Redis or PostgreSQL reached through ``proxy``."""


@contextlib.asynccontextmanager
async def _served(settings: Settings, service: str) -> AsyncIterator[Served]:
    """A gateway on the shared services; the front door before it reaching ``service``
    (``redis_url`` or ``database_url``) through a proxy."""
    async with running_gateway(settings) as gateway:
        admin = await issue_admin_key(gateway.pool, "outage test")
        catalog = load_catalog(None, {"QUEUEGATE_MOCK_URL": gateway.mock.url})
        async with TcpProxy(getattr(settings, service)) as proxy:
            door = settings.model_copy(update={service: proxy.url})
            async with serving(door, catalog) as url:
                yield Served(url, admin.key, proxy, door)


async def _answers_unavailable(client: httpx.AsyncClient, reason: str) -> None:
    """Live data: 503 with a stale payload naming ``reason``; every page: a 503 page saying it."""
    data = await client.get("/dashboard/live.json")
    assert data.status_code == 503
    assert data.json()["stale"] is True
    assert data.json()["reason"] == reason
    for path in PAGES:
        shown = await client.get(path)
        assert shown.status_code == 503, (path, shown.text)
        assert shown.headers["retry-after"]
        assert reason in shown.text


async def test_the_live_page_goes_stale_naming_redis_when_it_is_down(settings: Settings) -> None:
    # Given an administrator watching the Live page, fresh
    async with _served(settings, "redis_url") as served, chromium() as browser:
        page = await browser.new_page()
        await sign_in(page, served.url, served.admin_key)
        await page.goto(f"{served.url}/dashboard/live")
        await page.wait_for_selector("#live-state.fresh")

        # When the front door's Redis goes down (connections cut, new ones refused)
        await served.proxy.down()

        # Expect the page to mark itself stale, naming Redis, without a reload
        reason = redis_unreachable(served.settings)
        await page.wait_for_selector("#live-state.stale", timeout=10_000)
        assert reason in await page.inner_text("#live-state")
        # and its data and every page to answer 503 within the bound, saying why
        cookies = {c["name"]: c["value"] for c in await page.context.cookies()}
        async with httpx.AsyncClient(
            base_url=served.url, cookies=cookies, timeout=ANSWERED_WITHIN
        ) as client:
            await _answers_unavailable(client, reason)
            form = await client.get("/dashboard/sign-in")
            assert form.status_code == 503 and reason in form.text
        # and the Live page, loaded afresh, to render as a page
        reloaded = await page.goto(f"{served.url}/dashboard/live")
        assert reloaded is not None and reloaded.status == 503
        assert reason in await page.inner_text("main")


async def test_a_hung_redis_answers_stale_within_the_bound(settings: Settings) -> None:
    async with (
        _served(settings, "redis_url") as served,
        httpx.AsyncClient(base_url=served.url, timeout=ANSWERED_WITHIN) as client,
    ):
        await signed_in(client, served.admin_key)
        assert (await client.get("/dashboard/live.json")).status_code == 200
        # When the front door's Redis stops answering, its connections kept open (a stopped
        # process, a partition): a session's read is the first to wait
        served.proxy.hold_replies_after(b"HGETALL")
        # Expect the Live data and every page to answer 503 within the bound, naming Redis
        await _answers_unavailable(client, redis_unreachable(served.settings))
        assert served.proxy.held.is_set()


async def test_pages_say_postgresql_is_down(settings: Settings) -> None:
    async with (
        _served(settings, "database_url") as served,
        httpx.AsyncClient(base_url=served.url, timeout=ANSWERED_WITHIN) as client,
    ):
        await signed_in(client, served.admin_key)
        # When the front door's PostgreSQL goes down
        await served.proxy.down()
        # Expect every page to answer 503 within the bound, naming PostgreSQL
        await _answers_unavailable(client, database_unreachable(served.settings))


async def test_pages_answer_within_the_bound_while_postgresql_hangs(settings: Settings) -> None:
    async with (
        _served(settings, "database_url") as served,
        httpx.AsyncClient(base_url=served.url, timeout=PAGE_WAIT + 3) as client,
    ):
        await signed_in(client, served.admin_key)
        for path in PAGES:  # each read once: its session, then its own reads, answered
            assert (await client.get(path)).status_code == 200, path
        # When the front door's PostgreSQL stops answering, its connections kept open
        served.proxy.hang()
        try:
            # Expect every page and the Live data to answer 503 within the bound (before:
            # the overview and the Live data waited on their reads as long as it hung), naming
            # PostgreSQL alone (before: "PostgreSQL or Redis")
            for path in (*PAGES, "/dashboard/live.json"):
                shown = await client.get(path)
                assert shown.status_code == 503, (path, shown.text)
                assert "PostgreSQL is not reachable at" in shown.text, (path, shown.text)
                assert "Redis" not in shown.text, (path, shown.text)
        finally:
            await served.proxy.up()


async def test_a_key_not_yet_read_answers_503_within_the_bound_while_postgresql_hangs(
    settings: Settings,
) -> None:
    # Given a team's key the front door has not read yet, and its PostgreSQL hung
    async with _served(settings, "database_url") as served:
        await register(settings, "alpha", TeamConfig())
        _, key = await issue_key(settings, "alpha")
        served.proxy.hang()
        try:
            # When the key is presented
            async with openai.AsyncOpenAI(
                base_url=f"{served.url}/v1", api_key=key, max_retries=0, timeout=KEY_WAIT + 5
            ) as client:
                with pytest.raises(openai.APIStatusError) as refused:
                    await client.chat.completions.create(
                        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}]
                    )
        finally:
            await served.proxy.up()
    # Expect 503 within the bound, saying nothing was published (before: no answer at all,
    # for as long as PostgreSQL hung)
    assert refused.value.status_code == 503
    assert "nothing was published" in refused.value.message


async def test_a_page_done_while_the_services_are_asked_is_answered_at_once(
    settings: Settings,
) -> None:
    # Given the front door's Redis, which hangs once asked whether it answers (the probe of a
    # page in its last seconds), and a guarded page done once it hangs
    async with TcpProxy(settings.redis_url) as proxy:
        proxy.hang_at(b"PING")
        door_settings = settings.model_copy(update={"redis_url": proxy.url})
        async with FrontDoor(door_settings, load_catalog(None, {})) as door:
            app = FastAPI()
            app.state.frontdoor = door

            async def page() -> dict[str, str]:
                await proxy.hung.wait()
                return {"page": "shown"}

            app.router.add_api_route("/dashboard/slow", page, route_class_override=Guarded)
            transport = httpx.ASGITransport(app)
            try:
                async with httpx.AsyncClient(transport=transport, base_url="http://door") as http:
                    # When the page is asked for
                    asked = time.monotonic()
                    shown = asyncio.ensure_future(http.get("/dashboard/slow"))
                    await proxy.hung.wait()
                    probed = time.monotonic()
                    answer = await shown
                    answered = time.monotonic()
            finally:
                await proxy.up()  # the front door closes its Redis connections
    # Expect the page, done while the probe waited, answered at once (before: held until
    # the probe gave Redis up, READY_TIMEOUT later)
    assert answer.status_code == 200 and answer.json() == {"page": "shown"}
    assert probed - asked >= PAGE_WAIT - READY_TIMEOUT  # the probe is what it waited for
    assert answered - probed < READY_TIMEOUT / 2
