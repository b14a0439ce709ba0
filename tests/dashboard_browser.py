"""Headless Chromium (the system's, driven by Playwright) for the dashboard's tests."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator

from playwright.async_api import Browser, Page, async_playwright

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    async with async_playwright() as driver:
        browser = await driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            await browser.close()


async def sign_in(page: Page, base: str, key: str) -> None:
    """Paste ``key`` into the sign-in form and wait for the page it leads to."""
    await page.goto(f"{base}/dashboard/sign-in")
    await page.fill("#key", key)
    async with page.expect_navigation():
        await page.click("button[type=submit]")
