"""The dashboard in a real browser, over a gateway that has run real jobs: the numbers on its
pages are PostgreSQL's, a team sees its own pages only, and every page carries its CSP."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path
from unittest.mock import ANY

import httpx
import openai
import pytest
import redis.asyncio as aioredis
from playwright.async_api import Page

from admin.keys import issue_admin_key, revoke_team_key
from admin.teams import disable
from frontdoor.dashboard.render import money
from frontdoor.dashboard.security import CSP
from frontdoor.dashboard.session import COOKIE, SESSIONS_PER_KEY, SIGN_IN_COOKIE
from queuegate.keys import Keys
from queuegate.registry import TeamConfig, add_team, disable_team, set_team_config
from queuegate.settings import Settings
from tests.dashboard_browser import chromium, form_token, sign_in, signed_in
from tests.frontdoor_support import HELLO, Door, open_door

TEAMS = {
    "alpha": TeamConfig(budget_usd=Decimal("1"), rpm=600, max_queue_length=500),
    "beta": TeamConfig(budget_usd=Decimal("100")),
}


async def _run_jobs(door: Door, jobs: dict[str, int]) -> None:
    for team, count in jobs.items():
        async with door.client(team) as client:
            for _ in range(count):
                await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    await door.gateway.usage_rows(sum(jobs.values()))


async def _totals(door: Door, team: str) -> tuple[int, Decimal]:
    row = await door.gateway.pool.fetchrow(
        "SELECT count(*) AS n, coalesce(sum(cost_usd), 0) AS usd FROM usage_log WHERE team = $1",
        team,
    )
    return int(row["n"]), Decimal(row["usd"])


async def _stored_session(settings: Settings, session_id: str) -> dict[str, str]:
    """What Redis holds of a dashboard session: whose key it was, never the key."""
    client = aioredis.from_url(settings.redis_url, decode_responses=True)
    try:
        key = Keys(settings.redis_prefix).dashboard_session(session_id)
        return dict(await client.hgetall(key))  # type: ignore[misc]
    finally:
        await client.aclose()


def dollars(shown: str) -> Decimal:
    """The amount a page shows as ``$1,234.5`` (``-$0.5``)."""
    return Decimal(shown.replace("$", "").replace(",", ""))


async def _shot(page: Page, tmp_path: Path, name: str) -> None:
    await page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)


async def test_admin_overview_and_team_pages_show_what_postgres_holds(
    settings: Settings, tmp_path: Path
) -> None:
    # Given jobs run through the gateway for two teams, and an admin key
    async with open_door(settings, TEAMS) as door:
        await _run_jobs(door, {"alpha": 3, "beta": 2})
        admin = await issue_admin_key(door.gateway.pool, "dashboard test")
        alpha_n, alpha_usd = await _totals(door, "alpha")
        # alpha's budget cut below what it spent: it must stand out as over budget
        over = TEAMS["alpha"].model_copy(update={"budget_usd": alpha_usd / 2})
        await set_team_config(door.gateway.pool, "alpha", over)
        beta_n, beta_usd = await _totals(door, "beta")
        async with chromium() as browser:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            # When the administrator signs in
            await sign_in(page, door.url, admin.key)
            # Expect the overview, with each team's spend and requests as PostgreSQL counts
            assert page.url == f"{door.url}/dashboard"
            alpha = page.locator("#teams tr[data-team=alpha]")
            assert await alpha.locator(".requests").inner_text() == str(alpha_n)
            # exact, never rounded (an attack saw $0.0093 for 0.00927835)
            assert dollars(await alpha.locator(".spend").inner_text()) == alpha_usd
            assert "over" in (await alpha.get_attribute("class") or "")
            beta = page.locator("#teams tr[data-team=beta]")
            assert await beta.locator(".requests").inner_text() == str(beta_n)
            assert dollars(await beta.locator(".spend").inner_text()) == beta_usd
            assert await page.inner_text("#total-requests") == str(alpha_n + beta_n)
            assert await page.inner_text("#over-budget") == "1"
            # with a title on each bar, read on hover
            assert await page.locator("svg.chart rect title").count() >= 2
            await _shot(page, tmp_path, "overview")

            # And the team page an administrator opens from it
            await page.click("#teams tr[data-team=alpha] a")
            assert await page.inner_text("#spend") == money(alpha_usd)
            # what is left of its budget to the last decimal, though a person would round it
            assert dollars(await page.inner_text("#remaining")) == over.budget_usd - alpha_usd
            assert await page.inner_text("#requests") == f"{alpha_n} · 0"
            assert door.key_ids["alpha"] in await page.inner_text("#keys")
            limits = await page.inner_text("#limits")
            assert "600" in limits
            assert "Queue quota (bytes)\nthe gateway's default" in limits
            await _shot(page, tmp_path, "team-by-admin")

            # And the audit log, filtered by team
            await page.goto(f"{door.url}/dashboard/audit?team=beta")
            assert await page.locator("table.audit tbody tr").count() == beta_n
            await _shot(page, tmp_path, "audit")

            html = await page.content()
            assert admin.key not in html
            await page.goto(f"{door.url}/dashboard/live")
            await page.wait_for_selector("#live-teams tbody tr[data-team=alpha]")
            await _shot(page, tmp_path, "live")


async def test_a_team_sees_its_own_pages_only(settings: Settings, tmp_path: Path) -> None:
    async with open_door(settings, TEAMS) as door:
        await _run_jobs(door, {"alpha": 2, "beta": 1})
        alpha_n, _ = await _totals(door, "alpha")
        async with chromium() as browser:
            context = await browser.new_context(viewport={"width": 390, "height": 844})
            page = await context.new_page()
            # When alpha's key signs in (on a phone-sized screen)
            await sign_in(page, door.url, door.keys["alpha"])
            # Expect alpha's team page, and alpha's rows only in its audit log
            assert page.url == f"{door.url}/dashboard/teams/alpha"
            assert await page.inner_text("#requests") == f"{alpha_n} · 0"
            await _shot(page, tmp_path, "team-phone")
            await page.goto(f"{door.url}/dashboard/audit")
            teams = await page.locator("table.audit tbody tr td:nth-child(2)").all_inner_texts()
            assert teams == ["alpha"] * alpha_n
            # Expect another team's pages, the admin pages and the live data refused
            for path, status in [
                ("/dashboard/teams/beta", 403),
                ("/dashboard/teams/nosuchteam", 403),
                ("/dashboard/audit?team=beta", 403),
                ("/dashboard/live", 403),
                ("/dashboard/live.json", 403),
            ]:
                answer = await page.goto(door.url + path)
                assert answer is not None and answer.status == status, path
            overview = await page.goto(f"{door.url}/dashboard")
            assert overview is not None and page.url.endswith("/dashboard/teams/alpha")
            assert overview.headers["content-security-policy"] == CSP
            # And the session cookie out of scripts' and other sites' reach, the key nowhere
            [cookie] = [c for c in await context.cookies() if c["name"] == "queuegate_session"]
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
            assert door.keys["alpha"] not in await page.content()
            session = await _stored_session(settings, cookie["value"])
            assert session == {
                "team": "alpha",
                "key_id": door.key_ids["alpha"],
                "csrf": ANY,
                "generation": ANY,  # the team's, which disabling it replaces
            }

            # When a form posts sign-out without the session's CSRF token, it is refused
            async with httpx.AsyncClient(
                base_url=door.url, cookies={cookie["name"]: cookie["value"]}
            ) as client:
                forged = await client.post("/dashboard/sign-out", data={"csrf": "nope"})
                assert forged.status_code == 403
                still = await client.get("/dashboard/teams/alpha")
                assert still.status_code == 200
            # And the page's own sign-out ends the session
            async with page.expect_navigation():
                await page.click("header .sign-out button")
            assert page.url.endswith("/dashboard/sign-in")
            again = await page.goto(f"{door.url}/dashboard/teams/alpha")
            assert again is not None and page.url.endswith("/dashboard/sign-in")
            assert await _stored_session(settings, cookie["value"]) == {}


async def test_a_wrong_key_is_refused_on_the_sign_in_page(settings: Settings) -> None:
    async with open_door(settings, TEAMS) as door, chromium() as browser:
        page = await browser.new_page()
        await sign_in(page, door.url, "qg_not-a-real-key")
        assert page.url.endswith("/dashboard/sign-in")
        assert "unknown or revoked" in await page.inner_text(".error")
        assert "qg_not-a-real-key" not in await page.content()


async def test_the_sign_in_form_is_bound_to_a_form_the_dashboard_handed_out(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    async with (
        open_door(settings, TEAMS) as door,
        httpx.AsyncClient(base_url=door.url) as browser,
        httpx.AsyncClient(base_url=door.url) as forger,
    ):
        key = door.keys["alpha"]
        # Given a form handed out: its cookie names it, and its token is in Redis only
        token = await form_token(browser)
        form_id = browser.cookies[SIGN_IN_COOKIE]
        assert form_id != token
        stored = await redis_client.get(Keys(settings.redis_prefix).dashboard_sign_in(form_id))
        assert stored == token.encode()
        # When another site plants a cookie and posts a token of its choosing (double submit)
        forger.cookies.set(SIGN_IN_COOKIE, "planted", path="/dashboard")
        planted = await forger.post("/dashboard/sign-in", data={"key": key, "csrf": "planted"})
        # Expect it refused, no session opened, and a fresh form shown
        assert planted.status_code == 403
        assert COOKIE not in forger.cookies
        assert "did not come from this dashboard" in planted.text
        # When the form's token is posted under another form's cookie
        await form_token(forger)
        stolen = await forger.post("/dashboard/sign-in", data={"key": key, "csrf": token})
        assert stolen.status_code == 403
        # Expect its own form, posted with its own cookie, to sign in once
        posted = await browser.post("/dashboard/sign-in", data={"key": key, "csrf": token})
        assert posted.status_code == 303
        # and the form gone from Redis: posted again, it is refused
        assert (
            await redis_client.exists(Keys(settings.redis_prefix).dashboard_sign_in(form_id)) == 0
        )
        browser.cookies.set(SIGN_IN_COOKIE, form_id, path="/dashboard")
        again = await browser.post("/dashboard/sign-in", data={"key": key, "csrf": token})
        assert again.status_code == 403


async def test_an_audit_filter_postgresql_cannot_hold_gets_the_error_page(
    settings: Settings,
) -> None:
    async with open_door(settings, TEAMS) as door, httpx.AsyncClient(base_url=door.url) as client:
        admin = await issue_admin_key(door.gateway.pool, "ops")
        await signed_in(client, admin.key)
        for query, said in [
            ("model=%00", "model: a NUL byte is not allowed"),
            ("team=%00", "team: a NUL byte is not allowed"),
            ("since=9999-12-31T23:59:59-14:00", "out of range"),
        ]:
            # When the audit log is asked for it
            answer = await client.get(f"/dashboard/audit?{query}")
            # Expect the audit page, 400, saying which filter, with the dashboard's headers
            assert answer.status_code == 400, query
            assert answer.headers["content-security-policy"] == CSP
            assert answer.headers["content-type"].startswith("text/html")
            assert said in answer.text, query


async def test_an_audit_filter_given_twice_gets_the_error_page_not_the_last_ones_rows(
    settings: Settings,
) -> None:
    async with open_door(settings, TEAMS) as door, httpx.AsyncClient(base_url=door.url) as client:
        admin = await issue_admin_key(door.gateway.pool, "ops")
        await signed_in(client, admin.key)
        # When the audit log is asked for two teams' rows in one request
        answer = await client.get("/dashboard/audit?team=alpha&team=beta")
    # Expect the error page, 400, naming the filter and saying what to do
    assert answer.status_code == 400
    assert answer.headers["content-security-policy"] == CSP
    assert answer.headers["content-type"].startswith("text/html")
    assert "team given 2 times: give it once." in answer.text


async def test_an_audit_filter_naming_no_team_is_404_as_the_team_page_is(
    settings: Settings,
) -> None:
    async with open_door(settings, TEAMS) as door, httpx.AsyncClient(base_url=door.url) as client:
        admin = await issue_admin_key(door.gateway.pool, "ops")
        await signed_in(client, admin.key)
        # When an administrator filters the audit log, and opens a team page, by no team
        audit = await client.get("/dashboard/audit?team=nobody")
        team_page = await client.get("/dashboard/teams/nobody")
        # Expect both 404 naming it, not an empty audit log
        for answer in (audit, team_page):
            assert answer.status_code == 404
            assert "No team named nobody." in answer.text
        assert audit.headers["content-security-policy"] == CSP


async def test_wrong_keys_at_the_api_and_the_sign_in_share_one_limit_per_address(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given at most 3 wrong keys a minute from one address (forwarded by a proxy at loopback)
    settings = settings.model_copy(
        update={
            "failed_key_limit": 3,
            "failed_key_window": 60.0,
            "http_trusted_proxies": "127.0.0.1",
        }
    )
    wrong = "qg_000000000000_" + "x" * 43
    attacker = {"X-Forwarded-For": "203.0.113.9"}
    async with (
        open_door(settings, TEAMS) as door,
        httpx.AsyncClient(base_url=door.url, headers=attacker) as hammer,
        httpx.AsyncClient(base_url=door.url, headers={"X-Forwarded-For": "198.51.100.4"}) as other,
    ):
        # When that address presents 2 wrong keys to the API and 1 to the sign-in form
        api = openai.AsyncOpenAI(
            base_url=door.v1, api_key=wrong, default_headers=attacker, max_retries=0
        )
        async with api:
            for _ in range(2):
                with pytest.raises(openai.AuthenticationError):
                    await api.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
            token = await form_token(hammer)
            answer = await hammer.post("/dashboard/sign-in", data={"key": wrong, "csrf": token})
            assert answer.status_code == 401
            # Expect its next sign-in refused 429 with Retry-After, for a key never found
            # live as for a wrong one
            token = await form_token(hammer)
            live = {"key": door.keys["alpha"], "csrf": token}
            throttled = await hammer.post("/dashboard/sign-in", data=live)
            assert throttled.status_code == 429
            assert 0 < int(throttled.headers["retry-after"]) <= 60
            assert "Too many wrong keys" in throttled.text
            assert door.keys["alpha"] not in throttled.text
            # and its API calls too, in the API's shape
            with pytest.raises(openai.RateLimitError) as refused:
                await api.with_options(api_key=door.keys["beta"]).models.list()
            assert refused.value.code == "too_many_requests"
            assert 0 < int(refused.value.response.headers["retry-after"]) <= 60
        # Expect another address unaffected
        await signed_in(other, door.keys["alpha"])
        # and the count in Redis under the deployment's prefix, expiring with its window
        counted = Keys(settings.redis_prefix).failed_keys("203.0.113.9")
        assert int(await redis_client.get(counted)) == 3
        assert 0 < await redis_client.ttl(counted) <= 60


async def test_a_revoked_key_or_a_disabled_team_ends_its_sessions(settings: Settings) -> None:
    async with (
        open_door(settings, TEAMS) as door,
        httpx.AsyncClient(base_url=door.url) as alpha,
        httpx.AsyncClient(base_url=door.url) as beta,
    ):
        # Given a signed-in session of each team
        await signed_in(alpha, door.keys["alpha"])
        await signed_in(beta, door.keys["beta"])
        assert (await alpha.get("/dashboard/teams/alpha")).status_code == 200
        assert (await beta.get("/dashboard/teams/beta")).status_code == 200
        # When alpha's key is revoked and beta is disabled
        pool = door.gateway.pool
        assert await revoke_team_key(pool, "alpha", door.key_ids["alpha"])
        assert await disable_team(pool, "beta")
        # Then both sessions are sent to the sign-in page on their next request
        for client, path in ((alpha, "/dashboard/teams/alpha"), (beta, "/dashboard/teams/beta")):
            answer = await client.get(path)
            assert answer.status_code == 303
            assert answer.headers["location"] == "/dashboard/sign-in"


async def test_a_session_ended_by_disabling_its_team_stays_ended_once_enabled_again(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    async with (
        open_door(settings, TEAMS) as door,
        httpx.AsyncClient(base_url=door.url) as beta,
        httpx.AsyncClient(base_url=door.url) as alpha,
    ):
        # Given a signed-in session of beta's key, and one of alpha's
        await signed_in(beta, door.keys["beta"])
        await signed_in(alpha, door.keys["alpha"])
        cookie = beta.cookies[COOKIE]
        # When beta is disabled as `queuegate teams disable beta` does, then enabled again
        assert await disable(settings, "beta")
        await add_team(door.gateway.pool, "beta")
        # Expect the old cookie, replayed, sent to the sign-in page, and nothing left of it
        replayed = await beta.get("/dashboard/teams/beta")
        assert replayed.status_code == 303
        assert replayed.headers["location"] == "/dashboard/sign-in"
        assert await _stored_session(settings, cookie) == {}
        index = Keys(settings.redis_prefix).dashboard_sessions(door.key_ids["beta"])
        assert await redis_client.exists(index) == 0
        # and the team's key signing in anew; another team's session untouched
        await signed_in(beta, door.keys["beta"])
        assert (await beta.get("/dashboard/teams/beta")).status_code == 200
        assert (await alpha.get("/dashboard/teams/alpha")).status_code == 200


async def test_sign_ins_racing_a_disable_leave_no_session_once_enabled_again(
    settings: Settings,
) -> None:
    # Given a front door that trusts its copy of a live key for a minute, so sign-ins during
    # and after the disable still find beta's key live in it (and that serves the 40 keyless
    # requests of its sign-in pages at once)
    door_settings = settings.model_copy(
        update={"security_cache_ttl": 60.0, "http_keyless_requests": 64}
    )
    async with open_door(settings, TEAMS, door_settings=door_settings) as door:
        clients = [httpx.AsyncClient(base_url=door.url) for _ in range(41)]
        try:
            warm, racing, late = clients[0], clients[1:21], clients[21:]
            await signed_in(warm, door.keys["beta"])
            tokens = await asyncio.gather(*(form_token(client) for client in clients[1:]))
            by_client = dict(zip(clients[1:], tokens, strict=True))

            async def sign_in(client: httpx.AsyncClient) -> int:
                data = {"key": door.keys["beta"], "csrf": by_client[client]}
                return (await client.post("/dashboard/sign-in", data=data)).status_code

            # When 20 sign-ins run while `queuegate teams disable beta` runs
            *during, disabled = await asyncio.gather(
                *(sign_in(client) for client in racing), disable(settings, "beta")
            )
            # and 20 more once it is done, then beta is enabled again
            after = await asyncio.gather(*(sign_in(client) for client in late))
            await add_team(door.gateway.pool, "beta")

            # Expect no session of theirs live: every client is sent to the sign-in page
            pages = await asyncio.gather(
                *(client.get("/dashboard/teams/beta") for client in clients)
            )
            assert [page.status_code for page in pages] == [303] * len(clients)
            assert {page.headers["location"] for page in pages} == {"/dashboard/sign-in"}
            # and each sign-in answered (signed in, or refused as the team's key is), the
            # late ones refused
            assert disabled
            assert set(during) <= {303, 401}, during
            assert after == [401] * len(late)
            # and the key signing in anew
            await signed_in(warm, door.keys["beta"])
            assert (await warm.get("/dashboard/teams/beta")).status_code == 200
        finally:
            for client in clients:
                await client.aclose()


async def test_one_key_holds_a_bounded_number_of_sessions(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # A team signing in in a loop must not fill the shared Redis: its oldest sessions end.
    async with open_door(settings, TEAMS) as door:
        clients = [httpx.AsyncClient(base_url=door.url) for _ in range(SESSIONS_PER_KEY + 3)]
        try:
            for client in clients:
                await signed_in(client, door.keys["alpha"])
            first, last = clients[0], clients[-1]
            assert (await first.get("/dashboard/teams/alpha")).status_code == 303
            assert (await last.get("/dashboard/teams/alpha")).status_code == 200
            pattern = f"{settings.redis_prefix}:dashboard:session:*"
            stored = [key async for key in redis_client.scan_iter(match=pattern)]
            assert len(stored) == SESSIONS_PER_KEY
        finally:
            for client in clients:
                await client.aclose()
