"""The dashboard's Live page in a real browser: its numbers move as jobs flow through a real
worker, without a reload, it marks itself stale once that worker has stopped, and it shows
a deployment's 429 pause, and every deployment's breaker as `queuegate deployments` does."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import openai
import orjson
import redis.asyncio as aioredis
from playwright.async_api import Page

from admin.keys import issue_admin_key
from mockprovider import Behavior, MockConfig
from queuegate.db import create_pool
from queuegate.keys import Keys
from queuegate.metrics import BREAKER_STATE, set_breaker_state
from queuegate.registry import TeamConfig, disable_team
from queuegate.settings import Settings
from queuegate.topology import Topology
from router import load_catalog
from router.health import Health
from tests.dashboard_browser import chromium, sign_in
from tests.frontdoor_support import HELLO, open_door
from tests.teams import register

SLOW = MockConfig(default=Behavior(latency_ms=300))
"""A third of a second a call: jobs stay in flight long enough to be seen."""
RATE_LIMITED = MockConfig(
    models={"gpt-4o-mini": Behavior(error_rate=1.0, error_status=429, retry_after=60)}
)

ALPHA_JOBS_OUT = "#live-teams tr[data-team=alpha] td:nth-child(5)"
"""The Jobs/s out cell of alpha's row."""


@dataclass(frozen=True)
class Served:
    url: str
    admin_key: str
    alpha_key: str
    stop_worker: Callable[[], Awaitable[None]]


@contextlib.asynccontextmanager
async def _served(settings: Settings, mock_config: MockConfig) -> AsyncIterator[Served]:
    """Team alpha served by a gateway of the test's own and the front door; an admin key and
    a key of alpha."""
    async with open_door(settings, {"alpha": TeamConfig()}, mock_config) as door:
        admin = await issue_admin_key(door.gateway.pool, "live test")
        yield Served(door.url, admin.key, door.keys["alpha"], door.gateway.stop_worker)


async def test_the_live_page_moves_with_jobs_and_goes_stale_when_the_worker_stops(
    settings: Settings, tmp_path: Path
) -> None:
    # Given team alpha served by a worker of the test's own
    async with _served(settings, SLOW) as served, chromium() as browser:
        url = served.url
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        await sign_in(page, url, served.admin_key)
        # When the administrator watches the Live page while nothing runs
        await page.goto(f"{url}/dashboard/live")
        await page.wait_for_selector("#live-state.fresh")
        await page.wait_for_selector(ALPHA_JOBS_OUT)
        assert await page.inner_text("#workers") == "1"
        assert await page.inner_text(ALPHA_JOBS_OUT) == "0.00"
        # a mark that a reload would wipe
        await page.evaluate("document.body.dataset.sameLoad = 'yes'")

        # and 40 jobs flow through the front door
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=served.alpha_key, max_retries=0)
        jobs = asyncio.gather(*(_ask(client) for _ in range(40)))
        # Expect the page to count them as they finish, in place
        await page.wait_for_function(
            "s => Number(document.querySelector(s).textContent) > 0",
            arg=ALPHA_JOBS_OUT,
            timeout=20_000,
        )
        await jobs
        await client.close()
        await page.wait_for_function(
            "() => Number(document.getElementById('jobs-per-s').textContent) > 0"
        )
        assert await page.get_attribute("body", "data-same-load") == "yes"
        await page.screenshot(path=str(tmp_path / "live.png"), full_page=True)

        # When the worker stops
        await served.stop_worker()
        # Expect the page to say it is stale, still without a reload
        await page.wait_for_selector("#live-state.stale", timeout=20_000)
        state = await page.inner_text("#live-state")
        assert "no worker has reported" in state
        assert await page.inner_text("#workers") == "0"
        assert await page.get_attribute("body", "data-same-load") == "yes"
        assert "is-stale" in (await page.get_attribute("body", "class") or "")
        await page.screenshot(path=str(tmp_path / "live-stale.png"), full_page=True)


async def test_the_live_page_shows_a_deployments_429_pause(
    settings: Settings, tmp_path: Path
) -> None:
    # Given openai-main (gpt-4o-mini) answering every call 429, asking for a minute's pause
    async with _served(settings, RATE_LIMITED) as served, chromium() as browser:
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        await sign_in(page, served.url, served.admin_key)
        await page.goto(f"{served.url}/dashboard/live")
        await page.wait_for_selector("#live-state.fresh")
        # When a job asks for gpt-4o-mini (and falls back to claude-haiku)
        async with openai.AsyncOpenAI(
            base_url=f"{served.url}/v1", api_key=served.alpha_key, max_retries=0
        ) as client:
            answer = await client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=HELLO
            )
        assert answer.headers["x-queuegate-fallback"] == "true"
        # Expect the page, without a reload, to show openai-main paused with its 429 counted
        paused = "#live-deployments tr[data-deployment=openai-main]"
        # (the row may be listed before the worker's counts arrive: the breaker gauges are
        # the process's)
        await page.wait_for_function(
            "s => document.querySelector(s)?.cells[4].textContent === '1'",
            arg=paused,
            timeout=20_000,
        )
        row = page.locator(paused)
        pause = await row.locator("td:nth-child(6)").inner_text()
        left = int(pause.removeprefix("paused, ").removesuffix(" s left"))
        assert 0 < left <= 60, pause
        assert await row.get_attribute("class") == "near"
        # and the deployment that answered, unpaused
        haiku = page.locator("#live-deployments tr[data-deployment=anthropic-main]")
        assert await haiku.locator("td:nth-child(6)").inner_text() == "\u2013"  # an en dash: none
        await page.screenshot(path=str(tmp_path / "live-429.png"), full_page=True)


async def test_the_live_page_shows_the_shared_breaker_and_pause_of_every_deployment(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    keys = Keys(settings.redis_prefix)
    catalog = load_catalog(None, {"QUEUEGATE_MOCK_URL": "http://127.0.0.1:1"})
    health = Health(redis_client, keys, catalog)
    [opened] = catalog.resolve("gpt-4o-mini").deployments
    [paused] = catalog.resolve("claude-haiku").deployments
    async with _served(settings, SLOW) as served, chromium() as browser:
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        await sign_in(page, served.url, served.admin_key)
        await page.goto(f"{served.url}/dashboard/live")
        await page.wait_for_selector("#live-state.fresh")
        try:
            # Given openai-main's circuit opened and anthropic-main paused by a 429, by workers
            # since restarted: the running worker has called neither, nor holds their state
            for _ in range(catalog.breaker(opened).failures):
                await health.failure(opened)
            await health.rate_limited(paused, 60)
            BREAKER_STATE.remove(opened.name)
            # Expect the page to show both, as `queuegate deployments` does
            await _deployment_shows(page, opened.name, "open", paused=False)
            await _deployment_shows(page, paused.name, "closed", paused=True)

            # When a worker saw the circuit open, then the circuit's state and the pause expire
            set_breaker_state(opened.name, "open")
            await redis_client.pexpire(keys.breaker(opened.name), 1)
            await redis_client.pexpire(keys.paused(paused.name), 1)
            # Expect the page to show the circuit closed and the pause over, as Redis holds them
            await _deployment_shows(page, opened.name, "closed", paused=False)
            await _deployment_shows(page, paused.name, "closed", paused=False)
        finally:
            with contextlib.suppress(KeyError):  # the gauge is the process's: left clean
                BREAKER_STATE.remove(opened.name)


async def _deployment_shows(page: Page, deployment: str, breaker: str, *, paused: bool) -> None:
    """Wait for the Live page's row of ``deployment`` to show its breaker and pause so."""
    await page.wait_for_function(
        """([selector, breaker, paused]) => {
            const row = document.querySelector(selector);
            return row !== null && row.cells[1].textContent === breaker
                && row.cells[5].textContent.startsWith("paused") === paused;
        }""",
        arg=[f"#live-deployments tr[data-deployment={deployment}]", breaker, paused],
        timeout=10_000,
    )


async def _ask(client: openai.AsyncOpenAI) -> None:
    await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)  # type: ignore[arg-type]


async def test_the_live_page_lists_a_disabled_teams_backlog_marked_disabled(
    settings: Settings,
) -> None:
    # Given team beta disabled before any worker starts, its queue holding 2 jobs
    await register(settings, "beta", TeamConfig())
    pool = await create_pool(settings)
    try:
        await disable_team(pool, "beta")
    finally:
        await pool.close()
    async with _served(settings, SLOW) as served, chromium() as browser:
        topology = Topology.of(settings)
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            await topology.declare_team_queue(channel, "beta")
            jobs = await channel.get_exchange(topology.jobs_exchange)
            for i in range(2):
                job = {"job_id": f"j{i}", "team": "beta", "model": "gpt-4o-mini", "messages": HELLO}
                await jobs.publish(aio_pika.Message(orjson.dumps(job)), routing_key="beta")

        # When an operator opens the Live page
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        await sign_in(page, served.url, served.admin_key)
        await page.goto(f"{served.url}/dashboard/live")

        # Expect beta's row, marked disabled, with its 2 jobs queued, beside alpha's
        await page.wait_for_function(
            """() => {
                const row = document.querySelector("#live-teams tr[data-team=beta]");
                return row !== null && row.cells[0].textContent === "beta (disabled)"
                    && row.cells[1].textContent === "2";
            }""",
            timeout=10_000,
        )
        assert await page.inner_text("#live-teams tr[data-team=alpha] td:nth-child(1)") == "alpha"
