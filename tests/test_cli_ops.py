"""What an operator's mistakes get from the ``queuegate`` command: one line that says what to
do, nothing stored, no traceback; and money shown exactly whatever a team spent."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import redis.asyncio as aioredis

from accounting import migrate
from admin.keys import issue_admin_key
from admin.teams import add, quota_policy
from bench.chaos import PrivateRedis
from cli.reports import STALE_EXIT
from queuegate.broker import connect
from queuegate.db import create_pool
from queuegate.keys import Keys
from queuegate.management import BrokerAdmin
from queuegate.redis_client import redis_for
from queuegate.registry import TeamConfig
from queuegate.reporting import table
from queuegate.runtime import configure_logging
from queuegate.settings import Settings
from queuegate.status import NO_WORKER
from queuegate.topology import Topology
from tests.chaos.private_sentinel import MASTER, PrivateSentinels
from tests.dashboard_browser import signed_in
from tests.frontdoor_support import open_door
from tests.proxy import TcpProxy
from tests.support import exists
from tests.support import queuegate_cli as _cli

HUGE = "1" + "0" * 400
"""What ``--budget 1e400`` was stored as before budgets had a bound."""


async def _stored(settings: Settings, team: str) -> dict[str, object]:
    """The team's config as stored, without the fields that hold their defaults."""
    async with await create_pool(settings) as pool:
        raw = dict(await pool.fetchval("SELECT config FROM teams WHERE name = $1", team))
    defaults = TeamConfig().model_dump(mode="json")
    return {field: value for field, value in raw.items() if defaults.get(field, ...) != value}


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


async def test_absurd_limits_are_refused_in_one_line_and_nothing_is_stored(
    settings: Settings,
) -> None:
    # Given a team with a budget
    await add(settings, "alpha", identity="queue")
    assert (await _cli(settings, "teams", "set", "alpha", "--budget", "5"))[0] == 0
    for option, value, field in [
        ("--budget", "1e400", "budget_usd"),
        ("--budget", "0.00000000001", "budget_usd"),
        ("--rpm", "99999999999999999999999", "rpm"),
        ("--tpm", "99999999999999999999999", "tpm"),
        ("--max-queue", "99999999999999999999999", "max_queue_length"),
        ("--model", "gpt-4o-mini:budget=1e400", "models.gpt-4o-mini.budget_usd"),
    ]:
        # When an operator sets a value no gateway means
        code, _, stderr = await _cli(settings, "teams", "set", "alpha", option, value)
        # Expect one line naming the field and how to clear it (a model's limits with its
        # model's, not every model's: --unset models), and the stored config as it was
        assert code == 1, (option, value)
        said = _one_error_line(stderr)
        assert f"team alpha: {field}:" in said
        clear = "--model gpt-4o-mini:)" if field.startswith("models.") else f"--unset {field})"
        assert said.endswith(f"(or clear it: {clear}"), said
        assert await _stored(settings, "alpha") == {"budget_usd": "5"}


async def test_a_row_stored_out_of_bounds_is_repaired_with_teams_set(settings: Settings) -> None:
    # Given a budget stored by a version that had no bound
    await add(settings, "alpha", identity="queue")
    async with await create_pool(settings) as pool:
        await pool.execute(
            "UPDATE teams SET config = jsonb_build_object('budget_usd', $1::text, 'rpm', 60)"
            " WHERE name = 'alpha'",
            HUGE,
        )
    # When another field is set, then the bad one cleared
    kept = await _cli(settings, "teams", "set", "alpha", "--rpm", "120")
    cleared = await _cli(settings, "teams", "set", "alpha", "--unset", "budget_usd", "--rpm", "90")
    # Expect the first refused, naming the field and how to clear it; the second to repair it
    assert kept[0] == 1 and "--unset budget_usd" in _one_error_line(kept[2])
    assert cleared[0] == 0, cleared[2]
    assert await _stored(settings, "alpha") == {"rpm": 90}


async def test_a_field_both_set_and_unset_is_refused_in_one_line(settings: Settings) -> None:
    # Given a team with a token limit
    await add(settings, "alpha", identity="queue")
    assert (await _cli(settings, "teams", "set", "alpha", "--tpm", "6000"))[0] == 0
    # When one command sets it and clears it (the clear won, silently, and printed {})
    code, _, stderr = await _cli(
        settings, "teams", "set", "alpha", "--unset", "tpm", "--tpm", "600"
    )
    # Expect it refused in one line naming the field, and the stored config as it was
    assert code == 2
    assert "tpm: both set and --unset" in _one_error_line(stderr)
    assert await _stored(settings, "alpha") == {"tpm": 6000}


@asynccontextmanager
async def _no_administrator(settings: Settings) -> AsyncIterator[str]:
    """The session's management URL as a broker user without the administrator tag (as a
    team's own user is): it may use the API but change nothing on the broker."""
    user = f"{settings.namespace}.not-admin"
    async with BrokerAdmin.of(settings) as admin:
        await admin.put_user(user, "secret", tags="management")
        try:
            parts = urlsplit(settings.management_url)
            where = parts.netloc.rsplit("@", 1)[-1]
            yield urlunsplit(parts._replace(netloc=f"{user}:secret@{where}"))
        finally:
            await admin.delete_user(user)


async def test_teams_set_a_broker_refuses_changes_nothing_and_a_budget_needs_no_broker(
    settings: Settings,
) -> None:
    # Given a team with a queue quota of 10 jobs, and a management URL of no administrator
    await add(settings, "alpha", identity="queue")
    assert (await _cli(settings, "teams", "set", "alpha", "--max-queue", "10"))[0] == 0
    policy = quota_policy(settings, "alpha")
    async with _no_administrator(settings) as url:
        # When an operator sets a budget and a max queue through it, then a budget alone
        both = await _cli(
            settings, "teams", "set", "alpha", "--budget", "0.000001", "--max-queue", "5",
            QUEUEGATE_MANAGEMENT_URL=url,
        )  # fmt: skip
        budget = await _cli(
            settings, "teams", "set", "alpha", "--budget", "7", QUEUEGATE_MANAGEMENT_URL=url
        )
    # Expect the first refused in one line saying nothing changed, the registry and the
    # broker's policy as they were; the second stored without the management API.
    # (The old code stored the first's budget and max queue, then failed on the broker.)
    assert both[0] == 1
    assert "team alpha is unchanged: " in _one_error_line(both[2])
    assert budget[0] == 0, budget[2]
    assert await _stored(settings, "alpha") == {"max_queue_length": 10, "budget_usd": "7"}
    async with BrokerAdmin.of(settings) as admin:
        held = await admin.policy(policy)
    assert held is not None and held["definition"]["max-length"] == 10


async def _store_config(settings: Settings, team: str, config: str) -> None:
    """The team's row as an operator writes it with SQL, which the README allows."""
    async with await create_pool(settings) as pool:
        await migrate(pool, settings.database_schema)
        await pool.execute(
            "INSERT INTO teams (name, config) VALUES ($1, $2::text::jsonb)"
            " ON CONFLICT (name) DO UPDATE SET config = $2::text::jsonb",
            team,
            config,
        )


async def test_a_config_that_is_no_object_is_named_repaired_and_disabled(
    settings: Settings,
) -> None:
    # Given rows written with SQL: a config that is a JSON array, and one with a bad field
    await _store_config(settings, "epsilon", "[1, 2]")
    await _store_config(settings, "zeta", '{"rpm": "many"}')
    # When an operator looks at, secures, sets and disables them
    shown = await _cli(settings, "teams", "show", "epsilon")
    secured = await _cli(settings, "teams", "security", "epsilon", "--pii", "warn")
    repaired = await _cli(settings, "teams", "set", "epsilon", "--rpm", "5")
    disabled = [await _cli(settings, "teams", "disable", team) for team in ("epsilon", "zeta")]
    # Expect one line naming the problem and its repair; the others to do what they say
    # (the old code: a traceback from set, "no team named" from security, refusals from
    # disable, the zeta one after disabling it).
    said = _one_error_line(shown[2])
    assert "it is a JSON array, not an object" in said and "teams set epsilon" in said
    assert secured[0] == 0 and "pii warn" in secured[1], secured[2]
    assert repaired[0] == 0 and "is replaced by what is set" in repaired[2], repaired[2]
    assert await _stored(settings, "epsilon") == {"rpm": 5}
    assert [result[0] for result in disabled] == [0, 0], disabled
    async with await create_pool(settings) as pool:
        enabled = await pool.fetch("SELECT enabled FROM teams WHERE name IN ('epsilon', 'zeta')")
    assert [row["enabled"] for row in enabled] == [False, False]


async def test_a_config_nested_too_deep_to_read_is_named_and_repaired(settings: Settings) -> None:
    # Given a row written with SQL whose config nests 3,000 arrays (before: every command
    # reading the registry, and every worker, stopped with a RecursionError's traceback)
    await _store_config(settings, "eta", '{"x": ' + "[" * 3000 + "]" * 3000 + "}")
    # When an operator lists the teams, looks at the row and sets it
    listed = await _cli(settings, "teams", "list")
    shown = await _cli(settings, "teams", "show", "eta")
    repaired = await _cli(settings, "teams", "set", "eta", "--rpm", "5")
    # Expect the list, one line naming the problem, and the config replaced by what is set
    assert listed[0] == 0, listed[2]
    assert "it is JSON nested too deep to read" in _one_error_line(shown[2])
    assert repaired[0] == 0 and "is replaced by what is set" in repaired[2], repaired[2]
    assert await _stored(settings, "eta") == {"rpm": 5}


async def test_unset_refuses_unknown_fields_and_takes_a_list(settings: Settings) -> None:
    await add(settings, "alpha", identity="queue")
    await _cli(settings, "teams", "set", "alpha", "--rpm", "60", "--budget", "5", "--tpm", "9000")
    # When a field is named as the option is (budget), not as the config is (budget_usd)
    code, _, stderr = await _cli(settings, "teams", "set", "alpha", "--unset", "budget")
    # Expect it refused, naming the valid fields, and nothing changed
    assert code == 2 and "--unset budget: no such field" in stderr and "budget_usd" in stderr
    assert await _stored(settings, "alpha") == {"rpm": 60, "tpm": 9000, "budget_usd": "5"}
    # When two are cleared at once
    code, _, stderr = await _cli(settings, "teams", "set", "alpha", "--unset", "rpm,budget_usd")
    # Expect both cleared
    assert code == 0, stderr
    assert await _stored(settings, "alpha") == {"tpm": 9000}


async def test_a_model_given_without_limits_is_refused(settings: Settings) -> None:
    await add(settings, "alpha", identity="queue")
    code, _, stderr = await _cli(settings, "teams", "set", "alpha", "--model", "gpt-4o-mini")
    assert code == 2 and "sets no limit" in stderr and "gpt-4o-mini:" in stderr
    assert await _stored(settings, "alpha") == {}


async def test_a_model_limit_without_an_alias_is_refused_in_one_line(settings: Settings) -> None:
    # Given a team with a limit on one model
    await add(settings, "alpha", identity="queue")
    assert (await _cli(settings, "teams", "set", "alpha", "--model", "gpt-4o-mini:rpm=5"))[0] == 0
    for spec in (":", ":rpm=5", " :"):
        # When --model names no alias before its colon
        code, out, stderr = await _cli(settings, "teams", "set", "alpha", "--model", spec)
        # Expect a usage error in one line that says how to write it, and nothing changed
        assert (code, out) == (2, ""), (spec, stderr)
        assert "names no model alias before the colon: use ALIAS:" in _one_error_line(stderr)
        assert await _stored(settings, "alpha") == {"models": {"gpt-4o-mini": {"rpm": 5}}}


async def test_a_models_limit_set_keeps_its_others_and_one_is_cleared_alone(
    settings: Settings,
) -> None:
    # Given a team capping gpt-4o-mini's spend
    await add(settings, "alpha", identity="queue")
    model = ("teams", "set", "alpha", "--model")
    assert (await _cli(settings, *model, "gpt-4o-mini:budget=5"))[0] == 0
    # When its rpm is set (this dropped the cap silently), then the cap cleared alone
    assert (await _cli(settings, *model, "gpt-4o-mini:rpm=60"))[0] == 0
    capped = await _stored(settings, "alpha")
    assert (await _cli(settings, *model, "gpt-4o-mini:budget="))[0] == 0
    uncapped = await _stored(settings, "alpha")
    assert (await _cli(settings, *model, "gpt-4o-mini:"))[0] == 0
    # Expect the cap kept beside the rpm, then the rpm kept alone, then nothing
    assert capped == {"models": {"gpt-4o-mini": {"rpm": 60, "budget_usd": "5"}}}
    assert uncapped == {"models": {"gpt-4o-mini": {"rpm": 60}}}
    assert await _stored(settings, "alpha") == {}
    # ... and an alias given twice in one command refused, nothing changed (the last one alone
    # was kept: tpm=60 dropped)
    twice = ("gpt-4o-mini:tpm=60", "--model", "gpt-4o-mini:burst=2")
    code, _, stderr = await _cli(settings, *model, *twice)
    assert code == 2 and "is given twice: give each alias once" in stderr, stderr
    assert await _stored(settings, "alpha") == {}


async def test_bad_names_and_numbers_are_refused_without_a_traceback(settings: Settings) -> None:
    for args in [
        ("status", "--teams", "a!"),
        ("status", "--teams", "a" * 300),
        ("submit", "--team", "gamma", "--timeout", "nan", "x"),
        ("submit", "--team", "gamma", "--timeout", "-1", "x"),
        ("status", "--interval", "inf"),
        ("mock-provider", "--error-rate", "nan"),
        ("dlq", "list", "--limit", "-1"),
    ]:
        code, _, stderr = await _cli(settings, *args)
        assert code == 2, args
        assert "Traceback" not in stderr and "Invalid value" in stderr, args


async def test_bad_options_and_arguments_are_one_line_naming_the_help(settings: Settings) -> None:
    # When commands are given values their options refuse, options or commands that do not
    # exist, or no argument where one is needed
    for args, help_of in [
        (("teams", "set", "x", "--rpm", "abc"), "teams set"),
        (("status", "--teams", "bad name!"), "status"),
        (("status", "--no-such-option"), "status"),
        (("usage", "--json", "--csv"), "usage"),
        (("dlq", "list", "--limit", "-1"), "dlq list"),
        (("teams", "show"), "teams show"),
        (("no-such-command",), ""),
    ]:
        code, _, stderr = await _cli(settings, *args)
        # Expect a usage error's status, and one line that names the help to read, not a
        # panel drawn over several lines
        assert code == 2, (args, stderr)
        line = _one_error_line(stderr)
        assert line.endswith(f" {' '.join(['-m cli', help_of]).strip()} --help"), line
        assert "╭" not in stderr, stderr


async def test_status_of_a_team_that_does_not_exist_says_so_in_one_line(
    settings: Settings,
) -> None:
    # Given team alpha, registered with its queue
    await add(settings, "alpha", identity="queue")
    # When status is asked for it and for a team no one registered
    code, out, stderr = await _cli(settings, "status", "--teams", "alpha,nosuch")
    # Expect no row for it, but the line every report says of an unknown team, and its status
    assert (code, out) == (1, ""), stderr
    assert _one_error_line(stderr) == (
        "error: no team named nosuch: list them with queuegate teams list"
    )
    # and alpha alone still shown (stale: no worker runs)
    code, out, stderr = await _cli(settings, "status", "--teams", "alpha")
    assert (code, stderr.strip()) == (STALE_EXIT, f"stale: {NO_WORKER}")
    assert any(line.startswith("alpha ") for line in out.splitlines()), out


async def test_status_of_a_name_with_queues_but_no_registry_row_says_no_team(
    settings: Settings,
) -> None:
    # Given gamma's queues, left by a worker that once served it by name, and no row for it
    await add(settings, "alpha", identity="queue")
    connection = await connect(settings.amqp_url, name="test-leftover")
    async with connection:
        await Topology.of(settings).declare_team_queue(await connection.channel(), "gamma")
    # When status is asked for it
    code, out, stderr = await _cli(settings, "status", "--teams", "gamma")
    # Expect the line every report says of an unknown team, not an idle enabled team's row
    assert (code, out) == (1, ""), out + stderr
    assert _one_error_line(stderr) == (
        "error: no team named gamma: list them with queuegate teams list"
    )


async def test_a_worker_named_a_team_not_registered_refuses_to_start(settings: Settings) -> None:
    # Given alpha registered, and gamma not
    await add(settings, "alpha", identity="queue")
    # When a worker is started for both, any free metrics port (others share the host)
    code, out, stderr = await _cli(
        settings, "worker", "--teams", "gamma,alpha", QUEUEGATE_METRICS_PORT="0"
    )
    # Expect it refused in one line saying which and what to do, nothing of gamma's declared
    assert (code, out) == (1, ""), out + stderr
    assert _one_error_line(stderr) == (
        "error: no team named gamma: add it with queuegate teams add gamma, then start the worker"
    )
    assert not await exists(settings, Topology.of(settings).team_queue("gamma"))


async def test_worker_processes_whose_metrics_ports_pass_the_last_are_refused_at_once(
    settings: Settings,
) -> None:
    # When three worker processes are started from metrics port 65534
    code, out, stderr = await _cli(
        settings, "worker", "--processes", "3", QUEUEGATE_METRICS_PORT="65534"
    )
    # Expect it refused in one line saying what to set (before: the third process failed its
    # settings at each start, and its supervisor started it again forever)
    assert (code, out) == (1, ""), out + stderr
    assert _one_error_line(stderr) == (
        "error: 3 worker processes serve metrics on ports 65534 to 65536, past 65535: set "
        "QUEUEGATE_METRICS_PORT to at most 65533 (or 0 for any free ones)"
    )


async def test_a_worker_named_teams_not_registered_names_each_in_its_order(
    settings: Settings,
) -> None:
    # Given alpha registered, and gamma and delta not
    await add(settings, "alpha", identity="queue")
    # When a worker is started for all three, the registry asked once for them all
    code, out, stderr = await _cli(
        settings, "worker", "--teams", "gamma,alpha,delta", QUEUEGATE_METRICS_PORT="0"
    )
    # Expect it refused in one line naming both as they were given
    assert (code, out) == (1, ""), out + stderr
    assert _one_error_line(stderr) == (
        "error: no teams named gamma, delta: add each with queuegate teams add NAME, then start "
        "the worker"
    )


@pytest.mark.parametrize("teams", [",", "", " , "])
async def test_a_worker_given_an_empty_team_list_refuses_to_start(
    settings: Settings, teams: str
) -> None:
    # When a worker is started with --teams of no name (a shell variable left unset)
    code, out, stderr = await _cli(settings, "worker", "--teams", teams, QUEUEGATE_METRICS_PORT="0")
    # Expect a usage error in one line, not a worker serving every team
    assert (code, out) == (2, ""), out + stderr
    line = _one_error_line(stderr)
    assert "--teams names no team" in line and line.endswith(" -m cli worker --help"), line


async def test_submit_refuses_max_tokens_0_before_publishing(settings: Settings) -> None:
    # No worker runs: a job published would wait out the timeout, not be refused.
    code, _, stderr = await _cli(
        settings, "submit", "--team", "alpha", "--max-tokens", "0", "--timeout", "5", "x"
    )
    assert code == 1
    assert "invalid max_tokens: Input should be greater than or equal to 1" in _one_error_line(
        stderr
    )


async def test_status_shows_spend_exactly_in_its_table_and_json(settings: Settings) -> None:
    # Given a team that spent $0.00000075 against a $0.0000001 budget
    await add(settings, "alpha", identity="queue")
    assert (await _cli(settings, "teams", "set", "alpha", "--budget", "0.0000001"))[0] == 0
    month = datetime.now(UTC).strftime("%Y-%m")
    client = redis_for(settings)
    try:
        # (its ledger, in nano-USD, which status reads for a team with a budget)
        await client.hset(Keys(settings.redis_prefix).spend("alpha", month), "base", 750)
        # When status is asked for, as JSON and as a table
        code, out, stderr = await _cli(settings, "status", "--teams", "alpha", "--json")
        shown = await _cli(settings, "status", "--teams", "alpha")
    finally:
        await client.delete(Keys(settings.redis_prefix).spend("alpha", month))
        await client.aclose()
    # Expect both amounts as plain decimal strings, and the table showing the spend whole
    # (stale: no worker runs)
    assert code == STALE_EXIT, stderr
    [team] = json.loads(out)["teams"]
    assert (team["spend_usd"], team["budget_usd"]) == ("0.00000075", "0.0000001")
    row = next(line for line in shown[1].splitlines() if line.startswith("alpha"))
    assert row.split()[-2:] == ["$0.00000075", "$0.0000001"]


def test_a_money_column_has_one_number_of_decimals() -> None:
    rows = [
        {"team": "a", "cost_usd": Decimal("0.00000039"), "budget_usd": Decimal(1)},
        {"team": "b", "cost_usd": Decimal("0.5"), "budget_usd": Decimal("2.5")},
    ]
    rendered = table(rows, title="usage", wide=True)
    cost, budget = rendered.columns[1], rendered.columns[2]
    assert [str(c) for c in cost.cells] == ["0.00000039", "0.50000000"]
    assert [str(c) for c in budget.cells] == ["1.0", "2.5"]


async def test_a_stored_absurd_budget_fails_no_dashboard_page(settings: Settings) -> None:
    # Given a budget of 401 digits stored by a version that had no bound
    async with open_door(settings, {"alpha": TeamConfig()}) as door:
        await door.gateway.pool.execute(
            "UPDATE teams SET config = jsonb_build_object('budget_usd', $1::text)"
            " WHERE name = 'alpha'",
            HUGE,
        )
        admin = await issue_admin_key(door.gateway.pool, "ops")
        async with httpx.AsyncClient(base_url=door.url) as client:
            await signed_in(client, admin.key)
            # When an administrator opens the overview and the team's page
            overview = await client.get("/dashboard")
            page = await client.get("/dashboard/teams/alpha")
        # Expect the overview, without that budget, and the page saying what to correct
        assert overview.status_code == 200
        assert page.status_code == 409
        assert "budget_usd" in page.text and "queuegate teams set alpha" in page.text


async def test_errors_name_the_real_cause(settings: Settings) -> None:
    wrong_password = await _cli(
        settings, "status", "--teams", "alpha", QUEUEGATE_REDIS_URL="redis://bob:wr0ng@127.0.0.1/0"
    )
    base = settings.database_url.rsplit("/", 1)[0]
    no_database = await _cli(
        settings, "usage", QUEUEGATE_DATABASE_URL=f"{base}/no_such_db_{settings.database_schema}"
    )
    too_old = await _cli(settings, "audit", "prune", "--older-than", "99999999d")

    said = [_one_error_line(result[2]) for result in (wrong_password, no_database, too_old)]
    assert "refused the credentials" in said[0] and "wr0ng" not in said[0]
    assert "does not exist: create it" in said[1]
    assert "give at most 36500d" in said[2]


class _CountingProxy(TcpProxy):
    """Counts the connections it refuses while down: the pool's attempts to reconnect."""

    def __init__(self, target_url: str, attempts: int) -> None:
        super().__init__(target_url)
        self.refused = 0
        self.enough = asyncio.Event()
        self._attempts = attempts

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._up:
            self.refused += 1
            if self.refused >= self._attempts:
                self.enough.set()
        await super()._accept(reader, writer)


async def test_a_postgresql_outage_is_one_log_line(settings: Settings) -> None:
    # Given a process's logging as every role configures it, and a pool through a proxy
    root = logging.getLogger()
    before = (root.handlers[:], root.level)
    configure_logging("info")
    lines = io.StringIO()
    [handler] = root.handlers
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(lines)
    try:
        async with _CountingProxy(settings.database_url, attempts=4) as proxy:
            pool = await create_pool(settings.model_copy(update={"database_url": proxy.url}))
            try:
                # When PostgreSQL goes away for four of the pool's attempts to reconnect
                await proxy.down()
                await asyncio.wait_for(proxy.enough.wait(), timeout=60)
            finally:
                pool.terminate()
    finally:
        root.handlers = before[0]
        root.setLevel(before[1])
    # Expect one line saying so, with its cause, and no traceback
    logged = lines.getvalue().splitlines()
    lost = [line for line in logged if "PostgreSQL connections lost" in line]
    assert len(lost) == 1, logged
    assert "Traceback" not in lines.getvalue()
    assert not any("Failed to restore" in line for line in logged)


async def test_a_budget_of_minus_zero_is_stored_and_shown_as_zero(settings: Settings) -> None:
    # Given a team whose budget an operator sets to "-0"
    await add(settings, "alpha", identity="queue")

    # When it is set and status is asked for
    code, _, stderr = await _cli(settings, "teams", "set", "alpha", "--budget", "-0")
    shown = await _cli(settings, "status", "--teams", "alpha", "--json")

    # Expect it kept as the $0 budget workers enforce, never "-0", which reports read as none
    assert code == 0, stderr
    assert (await _stored(settings, "alpha"))["budget_usd"] == "0"
    [team] = json.loads(shown[1])["teams"]
    assert team["budget_usd"] == "0"


async def test_batch_submit_refuses_a_deadline_of_no_time_or_past_any_date(
    settings: Settings, tmp_path: Path
) -> None:
    # Given a valid batch file of team alpha's
    await add(settings, "alpha", identity="queue")
    batch = tmp_path / "b.jsonl"
    line = {
        "custom_id": "a",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
    }
    batch.write_text(json.dumps(line) + "\n")

    for deadline in ("0m", "99999999999999d"):
        # When it is submitted with a deadline of no time, or past any date
        code, _, stderr = await _cli(
            settings, "batch", "submit", str(batch), "--team", "alpha", "--deadline", deadline
        )
        # Expect a refusal that says what to give, not a batch failed at once or a traceback
        assert code == 2, stderr
        assert "give the batch some time" in stderr and "Traceback" not in stderr


async def test_a_port_outside_0_to_65535_is_a_usage_error(settings: Settings) -> None:
    for command in ("api", "mock-provider"):
        for port in ("99999", "70000", "-1"):
            # When a server is given a port no socket has
            code, _, stderr = await _cli(settings, command, "--port", port)
            # Expect a usage error in one line, not bind's OverflowError in a traceback
            # (api) or a server listening on another port (mock-provider: 99999 - 65536)
            assert code == 2, (command, port, stderr)
            assert "'--port'" in _one_error_line(stderr), stderr


async def test_a_worker_concurrency_outside_its_range_is_a_usage_error(settings: Settings) -> None:
    for value, bound in [
        ("0", "greater than or equal to 1"),
        ("10001", "less than or equal to 10000"),
    ]:
        # When a worker is given a concurrency (prefetch) no worker can take
        code, _, stderr = await _cli(settings, "worker", "--concurrency", value)
        # Expect a usage error in one line naming the option and its bound, as --port's is
        # (not exit 1 blaming QUEUEGATE_PREFETCH, which was never set)
        assert code == 2, (value, stderr)
        line = _one_error_line(stderr)
        assert "'--concurrency'" in line and bound in line, line


async def test_the_front_door_says_in_one_line_what_postgresql_refused(settings: Settings) -> None:
    where = urlsplit(settings.database_url)
    for url, said in [
        # a lone userinfo may be a password: hidden, in the URL and in the server's message
        (f"postgresql://SECRETKEY1@{where.netloc.rpartition('@')[2]}/test", "refused the"),
        ("postgresql://SECRETKEY1@127.0.0.1:1/test", "is not reachable"),
    ]:
        # When the front door starts with a PostgreSQL that refuses it or does not answer
        code, _, stderr = await _cli(
            settings, "api", "--port", "0", "--log-level", "warning", QUEUEGATE_DATABASE_URL=url
        )
        # Expect the failure's one line, which says what to do, and the status of a failure
        assert code == 1, stderr
        assert "Traceback" not in stderr and len(stderr) < 1000, stderr
        assert "SECRETKEY1" not in stderr and said in stderr, stderr
        assert "QUEUEGATE_DATABASE_URL" in stderr.splitlines()[0], stderr


async def test_a_user_postgresql_refuses_is_hidden_in_its_message(settings: Settings) -> None:
    # When a command's URL holds a lone userinfo, which PostgreSQL quotes as the role it lacks
    host = urlsplit(settings.database_url).netloc.rpartition("@")[2]
    url = f"postgresql://SECRETKEY1@{host}/test"
    code, _, stderr = await _cli(settings, "usage", QUEUEGATE_DATABASE_URL=url)
    # Expect its one line to say so with the userinfo hidden there too
    assert code == 1
    line = _one_error_line(stderr)
    assert 'refused the credentials (role "***" does not exist)' in line, line
    assert "SECRETKEY1" not in line, line


async def test_a_vhost_the_broker_refuses_is_said_so_not_as_rabbitmq_down(
    settings: Settings,
) -> None:
    # When a command's broker URL names a vhost the broker does not have
    parts = urlsplit(settings.amqp_url)
    url = urlunsplit(parts._replace(path="/no-such-vhost"))
    code, _, stderr = await _cli(settings, "status", QUEUEGATE_AMQP_URL=url)
    # Expect one line saying the broker refused the vhost and what to do (before: "RabbitMQ
    # is not reachable ...: start it", for a broker that answered)
    assert code == 1
    line = _one_error_line(stderr)
    assert "refused to open vhost 'no-such-vhost' for the user: create the vhost" in line, line


@pytest.mark.parametrize("command", [["usage"], ["worker", "--teams", "alpha"]])
async def test_a_database_url_its_client_cannot_use_is_refused_not_waited_for(
    settings: Settings, command: list[str]
) -> None:
    # When a command's database URL holds an option asyncpg cannot use
    url = f"{settings.database_url}?sslmode=bogus"
    code, _, stderr = await _cli(
        settings, *command, QUEUEGATE_DATABASE_URL=url, QUEUEGATE_METRICS_PORT="0"
    )
    # Expect one line saying so (before: "PostgreSQL is not reachable ...: start it", and a
    # worker waited for it as for an outage)
    assert code != 0
    line = _one_error_line(stderr)
    assert "invalid QUEUEGATE_DATABASE_URL: its client cannot use it (`sslmode`" in line, line


async def test_a_team_turned_api_key_is_told_its_broker_user_is_deleted(
    settings: Settings,
) -> None:
    # Given a team added the default way, with its own broker user
    user = (await add(settings, "alpha")).user
    assert user is not None
    # When its identity becomes api_key
    code, stdout, stderr = await _cli(
        settings, "teams", "security", "alpha", "--identity", "api_key"
    )
    # Expect it said that the user is gone (before: deleted without a word), and gone
    assert code == 0, stderr
    assert f"broker user {user} is deleted" in stdout
    async with BrokerAdmin.of(settings) as admin:
        assert not await admin.user_exists(user)


async def _worker_on(settings: Settings, redis_url: str) -> tuple[int, str, str]:
    """A worker of team alpha started on the Redis at ``redis_url``, run to its exit."""
    return await _cli(
        settings,
        "worker",
        "--teams",
        "alpha",
        QUEUEGATE_METRICS_PORT="0",
        QUEUEGATE_REDIS_URL=redis_url,
    )


async def test_a_worker_refuses_to_start_on_a_redis_that_evicts_keys(settings: Settings) -> None:
    # Given a Redis of its own that evicts keys with an expiry once past 30 MB (as a managed
    # one may): it would evict a job's stored outcome and leave the memory epoch, and the
    # job sent again was called and answered again
    await add(settings, "alpha", identity="queue")
    options = ("--maxmemory", "30mb", "--maxmemory-policy", "volatile-lru")
    async with PrivateRedis(*options) as evicting:
        # When a worker is started on it
        code, out, stderr = await _worker_on(settings, evicting.url)
    # Expect it refused in one line naming the policy and what to set
    assert (code, out) == (1, ""), out + stderr
    line = _one_error_line(stderr)
    assert "evicts keys when full (maxmemory-policy volatile-lru)" in line
    assert line.endswith("set its maxmemory-policy to noeviction, then start the worker")


async def test_a_worker_on_sentinels_names_the_primary_that_evicts(
    settings: Settings, tmp_path: Path
) -> None:
    # Given Redis behind Sentinels, whose primary evicts keys once full
    await add(settings, "alpha", identity="queue")
    async with PrivateSentinels(tmp_path) as group:
        async with aioredis.Redis.from_url((await group.primary()).url) as primary:
            await primary.config_set("maxmemory", "30mb")
            await primary.config_set("maxmemory-policy", "allkeys-lru")
        sentinels = group.settings(settings)
        # When a worker is started through them
        code, out, stderr = await _cli(
            settings,
            "worker",
            "--teams",
            "alpha",
            QUEUEGATE_METRICS_PORT="0",
            QUEUEGATE_REDIS_SENTINELS=str(sentinels.redis_sentinels),
            QUEUEGATE_REDIS_MASTER_NAME=sentinels.redis_master_name,
        )
    # Expect it refused naming that primary and its Sentinels (before: the address of
    # QUEUEGATE_REDIS_URL, a Redis it never asked)
    assert (code, out) == (1, ""), out + stderr
    line = _one_error_line(stderr)
    where = f"Redis primary {MASTER!r} of the Sentinels at {sentinels.redis_sentinels}"
    assert line.startswith(f"error: {where} evicts keys when full"), line


async def test_a_worker_started_before_its_redis_waits_and_refuses_one_that_evicts(
    settings: Settings,
) -> None:
    # Given a worker started while its Redis is not there yet (compose, a pod's start order)
    await add(settings, "alpha", identity="queue")
    later = PrivateRedis("--maxmemory", "30mb", "--maxmemory-policy", "allkeys-lru")
    env = {
        **os.environ,
        "QUEUEGATE_NAMESPACE": settings.namespace,
        "QUEUEGATE_DATABASE_SCHEMA": settings.database_schema,
        "QUEUEGATE_METRICS_PORT": "0",
        "QUEUEGATE_REDIS_URL": later.url,
    }
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", "worker", "--teams", "alpha",
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert worker.stderr is not None
    try:
        waiting = await asyncio.wait_for(worker.stderr.readline(), timeout=30)
        assert b"does not answer" in waiting and b"waiting for it" in waiting, waiting
        # When that Redis comes, evicting keys once full
        async with later:
            code = await asyncio.wait_for(worker.wait(), timeout=30)
            said = (await worker.stderr.read()).decode()
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()
    # Expect the worker to refuse it then, in one line, never having served
    assert code == 1, said
    assert "evicts keys when full (maxmemory-policy allkeys-lru)" in _one_error_line(said)


async def test_a_worker_refused_by_its_redis_says_so_in_one_line(settings: Settings) -> None:
    # Given a Redis that asks for a password, and a worker given the wrong one
    await add(settings, "alpha", identity="queue")
    async with PrivateRedis() as guarded:
        admin = aioredis.Redis.from_url(guarded.url)
        await admin.config_set("requirepass", "right-one")
        await admin.aclose()
        wrong = guarded.url.replace("redis://", "redis://:wrong-one@")
        # When it is started
        code, out, stderr = await _worker_on(settings, wrong)
    # Expect it refused in one line saying what to set, the password never shown
    assert (code, out) == (1, ""), out + stderr
    line = _one_error_line(stderr)
    assert "refused the worker's credentials" in line and "wrong-one" not in line


async def test_the_demo_refuses_a_redis_that_evicts_keys_as_a_worker_does(
    settings: Settings,
) -> None:
    # Given a Redis that evicts keys once full
    async with PrivateRedis("--maxmemory", "30mb", "--maxmemory-policy", "allkeys-lru") as lru:
        # When the demo, whose worker would store outcomes there, is run on it
        code, out, stderr = await _cli(settings, "demo", "--once", QUEUEGATE_REDIS_URL=lru.url)
    # Expect it refused in one line before anything ran, as a worker is
    assert (code, out) == (1, ""), out + stderr
    assert "evicts keys when full (maxmemory-policy allkeys-lru)" in _one_error_line(stderr)
