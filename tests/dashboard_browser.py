"""Signing in to the dashboard in its tests: headless Chromium (the system's, driven by
Playwright), or an HTTP client posting the sign-in form as a browser does."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import AsyncIterator

import httpx
from playwright.async_api import Browser, Page, async_playwright

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def missing_browser() -> str | None:
    """The line that ends a session whose browser tests have no Chromium to drive; None when
    it is there."""
    if os.access(CHROMIUM, os.X_OK):
        return None
    return (
        f"Chromium is not installed at {CHROMIUM} (the dashboard's browser tests drive it): "
        "install it (scripts/services does, or apt-get install chromium)"
    )


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


async def form_token(client: httpx.AsyncClient, path: str = "/dashboard/sign-in") -> str:
    """The CSRF token of the forms on the page ``path``: by default, of the sign-in form the
    dashboard hands ``client`` (with its cookie); on a signed-in page, the session's."""
    form = await client.get(path)
    match = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert match is not None, form.text
    return match[1]


async def signed_in(client: httpx.AsyncClient, key: str) -> None:
    """Sign ``client`` in with ``key`` through the sign-in form, as a browser posts it."""
    token = await form_token(client)
    answer = await client.post("/dashboard/sign-in", data={"key": key, "csrf": token})
    assert answer.status_code == 303, answer.text
