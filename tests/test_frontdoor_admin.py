"""The admin API at the front door (``/admin/usage``, ``/admin/audit-log``, ``/admin/teams``),
read with the official openai SDK's generic ``get`` against a real server, after real jobs
went through the gateway: the numbers are PostgreSQL's, a team reads only its own, an admin
key reads any, and pages hold still. Also: keys that may not call the team routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import anthropic
import asyncpg
import httpx
import openai
import pytest
import redis.asyncio as aioredis

from admin.keys import issue_admin_key
from mockprovider import Behavior, MockConfig
from queuegate.keys import Keys
from queuegate.registry import TeamConfig, disable_team
from queuegate.settings import Settings
from tests.dashboard_browser import form_token, signed_in
from tests.frontdoor_support import HELLO, Door, open_door

TEAMS = {
    "alpha": TeamConfig(budget_usd=Decimal(10)),
    "beta": TeamConfig(),
    "gamma": TeamConfig(),
}
FAILING = MockConfig(models={"llama-3.1-8b": Behavior(error_rate=1.0, error_status=503)})
SECRET_PROMPT = "the launch code is 4321"


@dataclass(frozen=True)
class Served:
    """The front door after alpha ran 3 + 1 + 1 (failed) jobs and beta 2, and an admin key."""

    door: Door
    admin_key: str

    @property
    def pool(self) -> asyncpg.Pool:
        return self.door.gateway.pool

    def admin(self, key: str | None = None) -> openai.AsyncOpenAI:
        """An SDK client of the admin API: the admin key, or the key given."""
        return openai.AsyncOpenAI(
            base_url=self.door.url, api_key=key or self.admin_key, max_retries=0
        )

    def team(self, team: str) -> openai.AsyncOpenAI:
        return self.admin(self.door.keys[team])


async def get(client: openai.AsyncOpenAI, path: str, **params: Any) -> dict[str, Any]:
    answer: dict[str, Any] = await client.get(path, cast_to=object, options={"params": params})
    return answer


async def run_jobs(door: Door, team: str, model: str, count: int) -> None:
    async with door.client(team) as client:
        for _ in range(count):
            await client.chat.completions.create(model=model, messages=HELLO)


@pytest.fixture
async def served(settings: Settings) -> AsyncIterator[Served]:
    async with open_door(settings, TEAMS, FAILING) as door:
        await run_jobs(door, "alpha", "gpt-4o-mini", 3)
        await run_jobs(door, "alpha", "claude-haiku", 1)
        async with door.client("alpha") as client:
            with pytest.raises(openai.InternalServerError):
                secret = [{"role": "user", "content": SECRET_PROMPT}]
                await client.chat.completions.create(model="local-llama", messages=secret)
        await run_jobs(door, "beta", "gpt-4o-mini", 2)
        await door.gateway.usage_rows(7)
        admin_key = (await issue_admin_key(door.gateway.pool, "ops")).key
        yield Served(door, admin_key)


async def totals_in_postgres(
    pool: asyncpg.Pool, team: str, model: str | None = None
) -> dict[str, Any]:
    row = await pool.fetchrow(
        "SELECT count(*) AS requests, count(*) FILTER (WHERE status = 'error') AS errors,"
        " sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,"
        " sum(cost_usd) AS cost_usd FROM usage_log"
        " WHERE team = $1 AND ($2::text IS NULL OR model_requested = $2)",
        team,
        model,
    )
    assert row is not None
    return dict(row)


def totals_of(report: dict[str, Any]) -> dict[str, Any]:
    return {
        "requests": report["requests"],
        "errors": report["errors"],
        "input_tokens": report["input_tokens"],
        "output_tokens": report["output_tokens"],
        "cost_usd": Decimal(report["cost_usd"]),
    }


async def test_a_team_reads_its_month_exactly_as_postgresql_holds_it(served: Served) -> None:
    # When alpha reads its month, whole and for one model
    async with served.team("alpha") as alpha:
        month = await get(alpha, "/admin/usage")
        one_model = await get(alpha, "/admin/usage", model="gpt-4o-mini")
        failed = await get(alpha, "/admin/usage", status="error")

    # Expect the totals, per model and per day of its usage rows, money as strings
    whole = await totals_in_postgres(served.pool, "alpha")
    assert month["team"] == "alpha" and totals_of(month) == whole
    assert whole["requests"] == 5 and whole["errors"] == 1 and whole["cost_usd"] > 0
    assert isinstance(month["cost_usd"], str)
    assert Decimal(month["budget_usd"]) == 10
    assert Decimal(month["budget_remaining"]) == 10 - whole["cost_usd"]
    models = await served.pool.fetch(
        "SELECT model_requested AS model, count(*) AS requests, sum(cost_usd) AS cost_usd"
        " FROM usage_log WHERE team = 'alpha' GROUP BY model_requested"
    )
    assert {(m["model"], m["requests"], Decimal(m["cost_usd"])) for m in month["by_model"]} == {
        (m["model"], m["requests"], m["cost_usd"]) for m in models
    }
    days = await served.pool.fetch(
        "SELECT (ts AT TIME ZONE 'UTC')::date AS day, count(*) AS requests"
        " FROM usage_log WHERE team = 'alpha' GROUP BY 1"
    )
    assert [(d["day"], d["requests"]) for d in month["daily"]] == [
        (d["day"].isoformat(), d["requests"]) for d in days
    ]
    # and the filters keep their jobs, the budget remaining still the whole month's
    assert totals_of(one_model) == await totals_in_postgres(served.pool, "alpha", "gpt-4o-mini")
    assert one_model["requests"] == 3
    assert one_model["budget_remaining"] == month["budget_remaining"]
    assert failed["requests"] == failed["errors"] == 1


async def test_the_admin_key_reads_any_team_and_must_name_it(served: Served) -> None:
    async with served.admin() as admin:
        beta = await get(admin, "/admin/usage", team="beta")
        with pytest.raises(openai.BadRequestError) as unnamed:
            await get(admin, "/admin/usage")
        with pytest.raises(openai.NotFoundError) as unknown:
            await get(admin, "/admin/usage", team="nobody")
        with pytest.raises(openai.BadRequestError) as bad_month:
            await get(admin, "/admin/usage", team="beta", month="2026-13")
        everyone = await get(admin, "/admin/audit-log", limit=100)
        only_beta = await get(admin, "/admin/audit-log", team="beta")

    assert totals_of(beta) == await totals_in_postgres(served.pool, "beta")
    assert beta["budget_usd"] is None and beta["budget_remaining"] is None
    assert "GET /admin/teams" in unnamed.value.message
    assert unknown.value.code == "not_found"
    assert "YYYY-MM" in bad_month.value.message
    assert len(everyone["entries"]) == 7
    assert {e["team"] for e in everyone["entries"]} == {"alpha", "beta"}
    assert [e["team"] for e in only_beta["entries"]] == ["beta", "beta"]


@pytest.mark.parametrize("path", ["/admin/usage", "/admin/audit-log"])
async def test_a_team_filter_naming_no_team_is_404_naming_it_on_every_report(
    served: Served, path: str
) -> None:
    # When an admin key filters a report by a team that is not registered
    async with served.admin() as admin:
        with pytest.raises(openai.NotFoundError) as unknown:
            await get(admin, path, team="nobody")
    # Expect 404 naming the team and where the teams are listed, not an empty report
    assert unknown.value.code == "not_found"
    assert unknown.value.message.endswith("no team named nobody: GET /admin/teams lists them")


@pytest.mark.parametrize(
    ("path", "params", "said"),
    [
        ("/admin/audit-log", {"model": "\x00"}, "model: a NUL byte is not allowed"),
        ("/admin/audit-log", {"team": "\x00"}, "team: a NUL byte is not allowed"),
        ("/admin/usage", {"team": "beta", "model": "\x00"}, "model: a NUL byte is not allowed"),
        ("/admin/audit-log", {"since": "9999-12-31T23:59:59-14:00"}, "since: 9999-12-31T23"),
        ("/admin/audit-log", {"until": "0001-01-01T00:00:00+14:00"}, "until: 0001-01-01T00"),
        ("/admin/usage", {"team": "beta", "month": "9999-12"}, "the last is 9999-11"),
    ],
)
async def test_a_filter_postgresql_cannot_hold_is_a_bad_request(
    served: Served, path: str, params: dict[str, str], said: str
) -> None:
    # When a filter holds a NUL byte, or a time or month beyond what a date holds
    async with served.admin() as admin:
        with pytest.raises(openai.BadRequestError) as refused:
            await get(admin, path, **params)
    # Expect a 400 saying which filter, not a 500 or a database outage
    assert refused.value.code == "invalid_request"
    assert said in refused.value.message and "\n" not in refused.value.message


async def test_a_team_reads_no_other_teams_rows_by_any_parameter(served: Served) -> None:
    async with served.admin() as admin:
        beta_page = await get(admin, "/admin/audit-log", team="beta", limit=1)
    beta_cursor = beta_page["next_cursor"]
    assert beta_cursor is not None
    alpha_rows = await served.pool.fetchval("SELECT count(*) FROM usage_log WHERE team='alpha'")

    async with served.team("alpha") as alpha:
        # Naming another team, existing or not, is refused alike
        for other in ("beta", "nobody"):
            for path in ("/admin/usage", "/admin/audit-log"):
                with pytest.raises(openai.PermissionDeniedError) as refused:
                    await get(alpha, path, team=other)
                assert refused.value.code == "forbidden"
                assert "own team only" in refused.value.message
        with pytest.raises(openai.PermissionDeniedError):
            await get(alpha, "/admin/teams")
        # Every other parameter keeps to alpha's rows
        pages = [
            await get(alpha, "/admin/audit-log", limit=100),
            await get(alpha, "/admin/audit-log", team="alpha", limit=100),
            await get(alpha, "/admin/audit-log", cursor=beta_cursor, limit=100),
            await get(alpha, "/admin/audit-log", model="gpt-4o-mini", status="ok"),
            await get(alpha, "/admin/audit-log", pii=False, since="2000-01-01"),
            await get(alpha, "/admin/audit-log", until="2999-01-01T00:00:00Z", offset=1),
        ]
        own = await get(alpha, "/admin/usage", team="alpha")

    assert len(pages[0]["entries"]) == alpha_rows == 5
    for page in pages:
        assert page["entries"] and {e["team"] for e in page["entries"]} == {"alpha"}
    assert own["team"] == "alpha"
    # The audit log says whether content was captured, and never holds it
    assert not any(e["captured"] for e in pages[0]["entries"])
    assert SECRET_PROMPT not in str(pages)


async def test_paging_by_cursor_holds_still_while_new_jobs_arrive(served: Served) -> None:
    snapshot = [
        r["job_id"]
        for r in await served.pool.fetch(
            "SELECT job_id FROM usage_log WHERE team = 'alpha' ORDER BY ts DESC, id DESC"
        )
    ]
    async with served.team("alpha") as alpha:
        # When alpha pages two rows at a time, and new jobs finish after its first page
        first = await get(alpha, "/admin/audit-log", limit=2)
        await run_jobs(served.door, "alpha", "gpt-4o-mini", 2)
        await served.door.gateway.usage_rows(9)
        walked, page = [e["job_id"] for e in first["entries"]], first
        while page["next_cursor"] is not None:
            page = await get(alpha, "/admin/audit-log", limit=2, cursor=page["next_cursor"])
            walked += [e["job_id"] for e in page["entries"]]
        # and then by offset, over the rows now there
        by_offset: list[str] = []
        offset: int | None = 0
        while offset is not None:
            page = await get(alpha, "/admin/audit-log", limit=2, offset=offset)
            by_offset += [e["job_id"] for e in page["entries"]]
            offset = page["next_offset"]
        with pytest.raises(openai.BadRequestError) as bad_cursor:
            await get(alpha, "/admin/audit-log", cursor="not-a-cursor")
        with pytest.raises(openai.BadRequestError) as too_many:
            await get(alpha, "/admin/audit-log", limit=5000)

    # Expect the cursor walk to be the rows as they were, each once, newest first
    assert walked == snapshot
    now = await served.pool.fetch(
        "SELECT job_id FROM usage_log WHERE team = 'alpha' ORDER BY ts DESC, id DESC"
    )
    assert by_offset == [r["job_id"] for r in now] and len(by_offset) == 7
    assert "next_cursor" in bad_cursor.value.message
    assert "1 to 1000" in too_many.value.message


async def test_the_admin_key_lists_teams_with_limits_and_budgets_and_no_secrets(
    served: Served,
) -> None:
    async with served.admin() as admin:
        raw = await admin.get("/admin/teams", cast_to=httpx.Response)
    listed = {team["name"]: team for team in raw.json()["teams"]}

    assert sorted(listed) == ["alpha", "beta", "gamma"]
    assert listed["alpha"]["enabled"] is True
    assert listed["alpha"]["config"]["budget_usd"] == "10"
    assert listed["alpha"]["identity"] == "queue" and listed["alpha"]["capture"] == "none"
    hashes = [r["key_hash"] for r in await served.pool.fetch("SELECT key_hash FROM api_keys")]
    for secret in [*served.door.keys.values(), served.admin_key, *hashes]:
        assert secret not in raw.text
    assert "qg_" not in raw.text and "qga_" not in raw.text


async def test_an_admin_key_serves_admin_routes_only(served: Served) -> None:
    door = served.door
    calls = door.gateway.mock.stats.calls
    async with openai.AsyncOpenAI(
        base_url=door.v1, api_key=served.admin_key, max_retries=0
    ) as client:
        with pytest.raises(openai.PermissionDeniedError) as chat:
            await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
        with pytest.raises(openai.PermissionDeniedError):
            await client.models.list()
    async with anthropic.AsyncAnthropic(
        base_url=door.url, api_key=served.admin_key, max_retries=0
    ) as claude:
        with pytest.raises(anthropic.PermissionDeniedError) as message:
            await claude.messages.create(model="claude-haiku", max_tokens=10, messages=HELLO)

    assert chat.value.code == "forbidden"
    assert "admin keys serve /admin only" in chat.value.message
    assert message.value.type == "permission_error"
    assert door.gateway.mock.stats.calls == calls


async def test_a_disabled_teams_key_is_refused_everywhere(served: Served) -> None:
    # Given gamma disabled before its key was ever used
    assert await disable_team(served.pool, "gamma")
    # When its key calls a team route and the admin API
    async with served.door.client("gamma") as client:
        with pytest.raises(openai.AuthenticationError) as chat:
            await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    async with served.team("gamma") as gamma:
        with pytest.raises(openai.AuthenticationError) as usage:
            await get(gamma, "/admin/usage")
    # Expect 401s that say why
    for refused in (chat, usage):
        assert refused.value.code == "unauthorized"
        assert "its team is disabled" in refused.value.message


async def test_a_disabled_teams_key_is_refused_as_such_and_is_no_wrong_key(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given one wrong key a minute allowed per address (forwarded by a proxy at loopback),
    # and beta disabled
    settings = settings.model_copy(
        update={
            "failed_key_limit": 1,
            "failed_key_window": 60.0,
            "http_trusted_proxies": "127.0.0.1",
        }
    )
    address = {"X-Forwarded-For": "203.0.113.7"}
    async with (
        open_door(settings, TEAMS) as door,
        httpx.AsyncClient(base_url=door.url, headers=address) as client,
    ):
        assert await disable_team(door.gateway.pool, "beta")
        api = openai.AsyncOpenAI(
            base_url=door.v1, api_key=door.keys["beta"], default_headers=address, max_retries=0
        )
        # When beta's real key signs in twice from that address, and calls the API
        refusals = []
        for _ in range(2):
            token = await form_token(client)
            data = {"key": door.keys["beta"], "csrf": token}
            refusals.append(await client.post("/dashboard/sign-in", data=data))
        async with api:
            with pytest.raises(openai.AuthenticationError) as refused:
                await api.models.list()
        # Expect each sign-in refused saying the team is disabled, not that the key is wrong
        for answer in refusals:
            assert answer.status_code == 403
            assert "Team beta is disabled" in answer.text and "unknown" not in answer.text
        assert "its team is disabled: ask an operator to enable team beta" in refused.value.message
        # ... nothing counted against the address, which still signs in with alpha's key
        counted = Keys(settings.redis_prefix).failed_keys("203.0.113.7")
        assert await redis_client.get(counted) is None
        await signed_in(client, door.keys["alpha"])
