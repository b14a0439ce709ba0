"""The dashboard's Batches page in a real browser, over batches the openai SDK created and a
gateway served: its numbers are the API's, its Cancel button cancels as the API does, and a
team sees and cancels its own batches only."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import openai
from playwright.async_api import Page

from admin.keys import issue_admin_key
from mockprovider import Behavior, MockConfig
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from tests.dashboard_browser import chromium, sign_in
from tests.frontdoor_support import Door, open_door
from tests.test_frontdoor_batches import ENDED, jsonl, openai_lines, polled

TEAMS = {"alpha": TeamConfig(), "beta": TeamConfig()}
SLOW = MockConfig(models={"llama-3.1-8b": Behavior(latency_ms=3000)})
"""``local-llama`` answers in 3 s: a batch of it is still running while the page is used."""


async def _create(client: openai.AsyncOpenAI, lines: list[dict[str, object]]) -> str:
    file = await client.files.create(file=("prompts.jsonl", jsonl(lines)), purpose="batch")  # type: ignore[arg-type]
    batch = await client.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    return batch.id


async def _spend(door: Door, batch_id: str) -> Decimal:
    """What usage_log billed for the batch's jobs."""
    return Decimal(
        await door.gateway.pool.fetchval(
            "SELECT coalesce(sum(cost_usd), 0) FROM usage_log WHERE job_id LIKE $1 || '.%'",
            batch_id,
        )
    )


def _usd(cell: str) -> Decimal:
    """The dollars a spend cell shows, "$0.00001380" read as 0.0000138."""
    assert cell.startswith("$"), cell
    return Decimal(cell.removeprefix("$"))


async def _cell(page: Page, batch_id: str, name: str) -> str:
    return await page.inner_text(f"#batches tr[data-batch={batch_id}] .{name}")


async def test_the_batches_page_counts_a_teams_batches_and_cancels_them(
    settings: Settings, tmp_path: Path
) -> None:
    async with (
        open_door(settings, TEAMS, SLOW) as door,
        door.client("alpha") as alpha,
        door.client("beta") as beta,
    ):
        # Given an ended batch of alpha's: 4 lines answered, 2 for a model nobody serves
        lines = openai_lines(4) + openai_lines(2, model="no-such-model")
        lines[-2]["custom_id"], lines[-1]["custom_id"] = "bad-0", "bad-1"
        done_id = await _create(alpha, lines)
        done = await polled(lambda: alpha.batches.retrieve(done_id), lambda b: b.status in ENDED)
        await door.gateway.usage_rows(6)
        # one of beta's, and one of alpha's still running: 300 slow lines, 32 at a time
        theirs = await _create(beta, openai_lines(2))
        running = await _create(alpha, openai_lines(300, model="local-llama"))
        await polled(lambda: alpha.batches.retrieve(running), lambda b: b.status == "in_progress")
        spend = await _spend(door, done_id)
        admin = await issue_admin_key(door.gateway.pool, "batches test")

        async with chromium() as browser:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            # When alpha opens its Batches page
            await sign_in(page, door.url, door.keys["alpha"])
            await page.click("header nav >> text=Batches")
            assert page.url == f"{door.url}/dashboard/batches"

            # Expect its ended batch counted as the API counts it, billed as usage_log is
            assert done.request_counts is not None
            assert await _cell(page, done_id, "status") == done.status == "completed"
            assert await _cell(page, done_id, "done") == str(done.request_counts.completed)
            assert await _cell(page, done_id, "failed") == str(done.request_counts.failed)
            assert await _cell(page, done_id, "written") == "6 / 6"
            # (as a number: the column writes each spend to the places of its longest)
            assert _usd(await _cell(page, done_id, "spend")) == spend > 0
            bar = page.locator(f"#batches tr[data-batch={done_id}] progress")
            assert (await bar.get_attribute("value"), await bar.get_attribute("max")) == (
                "6",
                "6",
            )
            # the running one with its Cancel button; beta's nowhere
            assert await _cell(page, running, "status") == "in_progress"
            assert await page.locator(f"tr[data-batch={running}] form.cancel").count() == 1
            assert await page.locator(f"tr[data-batch={done_id}] form.cancel").count() == 0
            assert await page.locator(f"tr[data-batch={theirs}]").count() == 0
            await page.screenshot(path=str(tmp_path / "batches.png"), full_page=True)

            # When beta's session posts a cancel of alpha's running batch, with its own
            # CSRF token, it is refused as if there were no such batch
            other = await browser.new_context()
            beta_page = await other.new_page()
            await sign_in(beta_page, door.url, door.keys["beta"])
            await beta_page.goto(f"{door.url}/dashboard/batches")
            assert await beta_page.locator(f"tr[data-batch={theirs}]").count() == 1
            assert await beta_page.locator(f"tr[data-batch={running}]").count() == 0
            token = await beta_page.input_value("header .sign-out input[name=csrf]")
            forged = await other.request.post(
                f"{door.url}/dashboard/batches/{running}/cancel", form={"csrf": token}
            )
            assert forged.status == 404
            assert (await alpha.batches.retrieve(running)).status == "in_progress"

            # When alpha presses Cancel on its running batch
            async with page.expect_navigation():
                await page.click(f"#batches tr[data-batch={running}] form.cancel button")
            assert await page.inner_text("#canceled") and running in page.url
            assert await _cell(page, running, "status") == "cancelling"
            cancelled = await polled(
                lambda: alpha.batches.retrieve(running),
                lambda b: b.status in ENDED,
            )
            # and an administrator looks at every team's batches
            admin_page = await (await browser.new_context()).new_page()
            await sign_in(admin_page, door.url, admin.key)
            await admin_page.goto(f"{door.url}/dashboard/batches")
            teams = await admin_page.locator("#batches tbody .team").all_inner_texts()
            await admin_page.screenshot(path=str(tmp_path / "batches-admin.png"), full_page=True)

    # Expect it cancelled as the API cancels: what was being served answered, the rest
    # canceled uncalled
    assert cancelled.status == "cancelled" and cancelled.request_counts is not None
    counts = cancelled.request_counts
    assert counts.completed + counts.failed == 300 and counts.failed > 0
    # (4 lines of alpha's first batch, beta's 2)
    assert door.gateway.mock.stats.calls == 4 + 2 + counts.completed
    # and the administrator seeing both teams' batches
    assert sorted(teams) == ["alpha", "alpha", "beta"]
