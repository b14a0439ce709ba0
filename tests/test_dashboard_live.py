"""The dashboard's Live page in a real browser: its numbers move as jobs flow through a real
worker, without a reload, and it marks itself stale once that worker has stopped."""

from __future__ import annotations

import asyncio
from pathlib import Path

import openai

from accounting import Accountant
from admin.keys import issue_admin_key
from frontdoor.serve import serving
from mockprovider import Behavior, MockConfig, MockProvider
from queuegate.db import create_pool
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from router import load_catalog, open_router
from tests.dashboard_browser import chromium, sign_in
from tests.frontdoor_support import HELLO, issue_key
from tests.teams import register
from workers import Worker

SLOW = MockConfig(default=Behavior(latency_ms=300))
"""A third of a second a call: jobs stay in flight long enough to be seen."""

ALPHA_JOBS_OUT = "#live-teams tr[data-team=alpha] td:nth-child(5)"
"""The Jobs/s out cell of alpha's row."""


async def test_the_live_page_moves_with_jobs_and_goes_stale_when_the_worker_stops(
    settings: Settings, tmp_path: Path
) -> None:
    # Given team alpha served by a worker of the test's own, stopped by its own event
    await register(settings, "alpha", TeamConfig())
    _, key = await issue_key(settings, "alpha")
    pool = await create_pool(settings)
    try:
        admin = await issue_admin_key(pool, "live test")
    finally:
        await pool.close()
    worker_stop, accounting_stop = asyncio.Event(), asyncio.Event()
    async with MockProvider(SLOW) as mock:
        env = {"QUEUEGATE_MOCK_URL": mock.url, "QUEUEGATE_MOCK_KEY": "sk-test-mock"}
        catalog = load_catalog(None, env)
        async with open_router(catalog, env, settings) as router, Accountant(settings) as books:
            worker = Worker(settings, router, teams=["alpha"], name="live-page-worker")
            working = asyncio.create_task(worker.run(worker_stop))
            accounting = asyncio.create_task(books.run(accounting_stop))
            try:
                await asyncio.wait_for(worker.ready.wait(), 10)
                async with serving(settings, catalog) as url, chromium() as browser:
                    page = await browser.new_page(viewport={"width": 1280, "height": 900})
                    await sign_in(page, url, admin.key)
                    # When the administrator watches the Live page while nothing runs
                    await page.goto(f"{url}/dashboard/live")
                    await page.wait_for_selector("#live-state.fresh")
                    await page.wait_for_selector(ALPHA_JOBS_OUT)
                    assert await page.inner_text("#workers") == "1"
                    assert await page.inner_text(ALPHA_JOBS_OUT) == "0.00"
                    # a mark that a reload would wipe
                    await page.evaluate("document.body.dataset.sameLoad = 'yes'")

                    # and 40 jobs flow through the front door
                    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
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
                    worker_stop.set()
                    await working
                    # Expect the page to say it is stale, still without a reload
                    await page.wait_for_selector("#live-state.stale", timeout=20_000)
                    state = await page.inner_text("#live-state")
                    assert "no worker has reported" in state
                    assert await page.inner_text("#workers") == "0"
                    assert await page.get_attribute("body", "data-same-load") == "yes"
                    assert "is-stale" in (await page.get_attribute("body", "class") or "")
                    await page.screenshot(path=str(tmp_path / "live-stale.png"), full_page=True)
            finally:
                worker_stop.set()
                accounting_stop.set()
                await asyncio.gather(working, accounting)


async def _ask(client: openai.AsyncOpenAI) -> None:
    await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)  # type: ignore[arg-type]
