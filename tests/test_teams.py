"""The team registry and its commands: configs, queue quotas, and workers picking them up."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple

import aio_pika
import asyncpg
import pytest
import redis.asyncio as aioredis
from typer.testing import CliRunner

from accounting.store import insert_usage
from admin.teams import (
    InForce,
    add,
    configure,
    control_policy,
    disable,
    in_force,
    listing,
    quota_policy,
    register,
    reply_policy,
    with_user,
    workers_connected,
)
from cli.main import app
from cli.reports import STALE_EXIT
from cli.teams import STORE_WAIT
from mockprovider import Behavior, MockConfig, MockProvider
from producer import GatewayClient, JobHandle
from queuegate.db import create_pool, worker_application_name
from queuegate.errors import BudgetExhausted, ConfigError, QueueFull, ServiceUnavailable
from queuegate.keys import Keys
from queuegate.livestats import read_workers
from queuegate.management import BrokerAdmin
from queuegate.messages import UsageEvent
from queuegate.redis_client import redis_for
from queuegate.registry import RESERVED_NAMES, TeamConfig, read_registry, sees, set_team_config
from queuegate.settings import Settings
from queuegate.spend import (
    Scope,
    current_month,
    from_nano,
    ledger_spent,
    reconcile,
    reconciler_token,
    to_nano,
)
from queuegate.status import NO_WORKER, DrainingWorker, Status, StatusReader
from queuegate.tenancy import broker_user
from queuegate.topology import CONTROL_MAX_BYTES, Bound, Topology
from queuegate.urls import redact_url
from tests.chaos.harness import start_worker, stop_workers, worker_env
from tests.conftest import TEST_TEAMS
from tests.proxy import TcpProxy
from tests.support import Gateway, drop_test_namespace, running_gateway, wait_until
from workers.admission.budgets import Budgets
from workers.admission.scripts import Scripts

HELLO = [{"role": "user", "content": "Hello"}]
DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


@pytest.fixture
async def alpha(settings: Settings) -> AsyncIterator[str]:
    """Team alpha registered; its quota policy removed afterwards."""
    await add(settings, "alpha", identity="queue")  # these tests publish as the guest user
    yield "alpha"
    async with BrokerAdmin.of(settings) as admin:
        await admin.delete_policy(quota_policy(settings, "alpha"))


async def test_a_full_queue_refuses_jobs_and_keeps_the_ones_it_took(
    settings: Settings, alpha: str
) -> None:
    # Given team alpha's queue limited to 5 jobs, and no worker serving it (one serving
    # another team answers the client's control request)
    await configure(settings, alpha, {"max_queue_length": 5})

    # When the team publishes until the broker refuses
    accepted = []
    async with (
        running_gateway(settings, teams=("gamma",)),
        GatewayClient(settings, team=alpha) as client,
    ):
        with pytest.raises(QueueFull, match="queue is full"):
            for _ in range(20):
                accepted.append(await client.submit(client.job("gpt-4o-mini", HELLO)))

        # Expect the quota (a quorum queue may take one more) and every accepted job queued
        assert len(accepted) in (5, 6)
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(
                Topology(settings.namespace).team_queue(alpha), passive=True
            )
            assert queue.declaration_result.message_count == len(accepted)

        # and answered once a worker runs
        async with running_gateway(settings):
            results = [await handle.result(timeout=10) for handle in accepted]
        assert {r.status for r in results} == {"ok"}


async def test_a_teams_queue_refuses_jobs_past_its_bytes_by_default_and_others_still_flow(
    settings: Settings,
) -> None:
    # Given teams alpha and beta added the default way (no quota set) under a gateway default
    # of 64 KiB of jobs a queue, and no worker serving alpha
    small = settings.model_copy(update={"max_queue_bytes": 64 * 1024})
    for team in ("alpha", "beta"):
        await add(small, team, identity="queue")  # these tests publish as the guest user
    bulky = [{"role": "user", "content": "x" * 16_000}]  # some 16 KiB a job

    # When alpha publishes bulky jobs until the broker refuses
    accepted = []
    async with (
        running_gateway(settings, teams=("beta",)) as gateway,
        GatewayClient(settings, team="alpha") as alpha,
    ):
        with pytest.raises(
            QueueFull, match=r"queue is full \(its quota of jobs or of bytes\); retry"
        ):
            for _ in range(20):
                accepted.append(await alpha.submit(alpha.job("gpt-4o-mini", bulky)))

        # Expect four jobs kept (a quorum queue may take one more), the refused one not
        assert len(accepted) in (4, 5)
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(
                Topology(settings.namespace).team_queue("alpha"), passive=True
            )
            assert queue.declaration_result.message_count == len(accepted)

        # and beta's jobs still answered meanwhile
        async with gateway.client("beta") as beta:
            result = await beta.chat("gpt-4o-mini", HELLO, timeout=10)
        assert result.status == "ok"


async def test_an_operator_sets_a_teams_bytes_in_a_size_and_teams_add_puts_lost_bounds_back(
    settings: Settings, alpha: str
) -> None:
    # When an operator gives team alpha its own bound in bytes, as a size
    code, _, stderr = await _queuegate(
        settings, "teams", "set", alpha, "--max-queue-bytes", "32KiB"
    )

    # Expect it on the team's queue policy, beside the gateway's default count of jobs
    assert code == 0, stderr
    async with BrokerAdmin.of(settings) as admin:
        quota = await admin.policy(quota_policy(settings, alpha))
        assert quota is not None
        assert quota["definition"] == {
            "max-length": settings.max_queue_length,
            "max-length-bytes": 32 * 1024,
            "overflow": "reject-publish",
            "dead-letter-routing-key": alpha,
        }

        # and its control queue bounded in bytes too
        control = await admin.policy(control_policy(settings))
        assert control is not None
        assert control["definition"]["max-length-bytes"] == CONTROL_MAX_BYTES

        # and, the policy gone (as for a team of an earlier version), put back by teams add
        await admin.delete_policy(quota_policy(settings, alpha))
        await add(settings, alpha)
        quota = await admin.policy(quota_policy(settings, alpha))
        assert quota is not None
        assert quota["definition"]["max-length-bytes"] == 32 * 1024


async def test_a_running_worker_applies_a_new_config_within_seconds(
    settings: Settings, alpha: str
) -> None:
    # Given a worker serving team alpha without a budget
    quick = settings.model_copy(update={"teams_refresh": 0.1})
    async with running_gateway(quick) as gw, gw.client(alpha) as client:
        assert (await client.chat("gpt-4o-mini", HELLO, timeout=10)).status == "ok"

        # When an operator sets a zero budget
        await configure(settings, alpha, {"budget_usd": Decimal(0)})
        admission = gw.worker.admission
        assert admission is not None
        await wait_until(lambda: admission.config(alpha).budget_usd == 0)

        # Expect the next job refused without a restart
        result = await client.chat("gpt-4o-mini", HELLO, timeout=10)
        assert result.error is not None and result.error.code == "budget_exhausted"


async def test_a_running_worker_applies_a_lowered_budget_to_the_next_job_at_once(
    settings: Settings, alpha: str
) -> None:
    # Given a worker serving team alpha without a budget, its registry read again only every
    # ten minutes
    slow = settings.model_copy(update={"teams_refresh": 600.0})
    async with running_gateway(slow) as gw, gw.client(alpha) as client:
        assert (await client.chat("gpt-4o-mini", HELLO, timeout=10)).status == "ok"

        # When an operator sets a zero budget, and waits for the worker to serve under it
        configured = await configure(settings, alpha, {"budget_usd": Decimal(0)})
        confirmed = await in_force(settings, configured.change, 5)

        # Expect the worker to confirm within moments, not at its refresh ten minutes on,
        # and the next job refused, the provider not called
        assert (len(confirmed.workers), confirmed.pending) == (1, [])
        result = await client.chat("gpt-4o-mini", HELLO, timeout=10)
    assert result.error is not None and result.error.code == "budget_exhausted"
    assert gw.mock.stats.calls == 1


@asynccontextmanager
async def held(
    settings: Settings, alpha: str, jobs: int, *, named: bool = False, rpm: int = 6
) -> AsyncIterator[Held]:
    """Team alpha at ``rpm`` (one request every ten seconds), served by a worker that reads the
    registry again only every ten minutes (told of changes at once), one job published and
    answered, then ``jobs`` more held in the worker waiting for the team's bucket, each
    holding its reservation in the team's budget ledger.
    ``named``: the worker serves alpha by name (``--teams``), not as every enabled team."""
    await configure(settings, alpha, {"rpm": rpm, "burst": 1, "budget_usd": Decimal(10)})
    slow = settings.model_copy(update={"teams_refresh": 600.0})
    teams = (alpha,) if named else ()
    async with running_gateway(slow, teams=teams) as gw, gw.client(alpha) as client:
        assert (await client.chat("gpt-4o-mini", HELLO, timeout=10)).status == "ok"
        handles = [await client.submit(client.job("gpt-4o-mini", HELLO)) for _ in range(jobs)]
        # Not the worker's jobs in flight: a job counts from its delivery, and reserves its
        # budget (with its claim, or in admission) only some round trips later. A test
        # reading the ledger in between missed a reservation 1 run in many under CPU load.
        await _reserved(settings, alpha, jobs)
        yield Held(gw, handles)


async def _reserved(settings: Settings, team: str, jobs: int) -> None:
    """Once ``jobs`` reservations are open in the team's budget ledger for this month."""
    client = redis_for(settings)
    ledger = Keys(settings.redis_prefix).spend(team, current_month())
    try:
        async with asyncio.timeout(10):
            while True:
                if sum(field.startswith(b"r:") for field in await client.hkeys(ledger)) == jobs:
                    return
                await asyncio.sleep(0.01)  # no event announces a reserve
    finally:
        await client.aclose()


class Held(NamedTuple):
    gw: Gateway
    handles: list[JobHandle]


async def test_jobs_held_for_the_rate_are_refused_once_their_budget_is_cut(
    settings: Settings, alpha: str
) -> None:
    # Given jobs held in the worker waiting for their team's rate
    async with held(settings, alpha, jobs=3) as (gw, handles):
        # When an operator cuts the team's budget under what it spent
        await configure(settings, alpha, {"budget_usd": Decimal("0.000000001")})

        # Expect each held job refused within the check's second, the provider not called
        results = [await handle.result(timeout=5) for handle in handles]
    assert [r.error.code if r.error else r.status for r in results] == ["budget_exhausted"] * 3
    assert gw.mock.stats.calls == 1


async def test_a_job_reserved_with_its_claim_under_a_budget_cut_before_its_admission_is_refused(
    settings: Settings, alpha: str
) -> None:
    # Given team alpha with a $10 budget, served by a worker that reaches Redis through a
    # proxy, and a job whose claim (its reserve under that budget riding with it) hangs on
    # its way to Redis
    await configure(settings, alpha, {"budget_usd": Decimal(10)})
    async with TcpProxy(settings.redis_url) as proxy:
        proxied = settings.model_copy(update={"redis_url": proxy.url})
        async with running_gateway(proxied) as gw, gw.client(alpha) as client:
            admission = gw.worker.admission
            assert admission is not None
            job = client.job("gpt-4o-mini", HELLO)
            proxy.hang_at(job.job_id.encode())
            handle = await client.submit(job)
            await asyncio.wait_for(proxy.hung.wait(), 10)

            # When an operator cuts the budget to nothing, the worker applies the cut, and
            # then the claim goes through, reserved under the budget before it
            cut = Decimal("0.000000001")
            await configure(settings, alpha, {"budget_usd": cut})
            await wait_until(lambda: admission.config(alpha).budget_usd == cut)
            await proxy.up()
            result = await handle.result(timeout=10)

    # Expect the job refused as any job admitted under the cut, the provider not called
    assert result.error is not None, result.status
    assert result.error.code == "budget_exhausted", result.error.message
    assert gw.mock.stats.calls == 0


async def test_jobs_held_for_the_rate_whose_budget_is_cut_to_fit_one_do_not_wait_for_each_other(
    settings: Settings, alpha: str, redis_client: aioredis.Redis
) -> None:
    # Given two jobs held in the worker waiting for their team's rate (one request every five
    # seconds), each holding its budget reservation
    async with held(settings, alpha, jobs=2, rpm=12) as (gw, handles):
        keys, month = Keys(settings.redis_prefix), current_month()
        ledger = keys.spend(alpha, month)
        base, open_, reserved = await redis_client.hmget(ledger, ["base", "open", "reserved"])
        # Spent: the first job's cost too, in open until accounting reconciles it into base.
        spent, each = int(base) + int(open_) - int(reserved), int(reserved) // 2

        # When an operator cuts the budget to what was spent and one and a half reservations
        budget = from_nano(spent + each * 3 // 2)
        await configure(settings, alpha, {"budget_usd": budget})

        # Expect both answered at the team's rate: one reserved again under the new budget,
        # the other back in the queue until the first settled, not both waiting for each
        # other until the admission's wait ran out and refused as rate limited
        results = [await handle.result(timeout=40) for handle in handles]
    # A failed job named by its error's code and message: its status alone says little.
    answers = [(r.error.code, r.error.message) if r.error else r.status for r in results]
    assert answers == ["ok", "ok"]
    assert gw.mock.stats.calls == 3


@pytest.mark.parametrize("named", [False, True], ids=["every_team", "named_team"])
async def test_jobs_held_for_the_rate_go_back_to_the_queue_when_their_team_is_disabled(
    settings: Settings, alpha: str, named: bool
) -> None:
    # Given jobs held in the worker waiting for their team's rate (a worker of every enabled
    # team, or one told to serve alpha by name, which a disable overrules too)
    async with held(settings, alpha, jobs=3, named=named) as (gw, _):
        # When an operator disables the team
        assert await disable(settings, alpha)

        # Expect them back in its queue within the check's second, uncalled and unanswered
        await wait_until(lambda: gw.worker.in_flight == 0, timeout=5)
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(gw.topology.team_queue(alpha), passive=True)
        assert queue.declaration_result.message_count == 3
    assert gw.mock.stats.calls == 1


async def test_a_budget_set_again_holds_the_spend_made_while_the_team_had_none(
    settings: Settings, alpha: str, redis_client: aioredis.Redis, pool: asyncpg.Pool
) -> None:
    # Given team alpha's spend ledger made under a budget, then the budget unset, and $0.50
    # spent meanwhile (in usage_log: no reserve or settle kept the ledger)
    await configure(settings, alpha, {"budget_usd": Decimal(1)})
    keys = Keys(settings.redis_prefix)
    month = current_month()
    await reconcile(redis_client, pool, keys, [Scope(alpha)], month, token=reconciler_token())
    await configure(settings, alpha, {"budget_usd": None})
    spent = UsageEvent(
        job_id="unbudgeted", team=alpha, model_requested="gpt-4o-mini", status="ok",
        cost_usd=Decimal("0.50"), ts=datetime.now(UTC),
    )  # fmt: skip
    await insert_usage(pool, [spent])

    # When an operator sets a budget below that spend
    config = (await configure(settings, alpha, {"budget_usd": Decimal("0.40")})).config

    # Expect the ledger to hold it, and the next job refused, without waiting for accounting
    assert await ledger_spent(redis_client, keys, alpha, month) == Decimal("0.50")
    budgets = Budgets(redis_client, Scripts(redis_client, keys), keys, pool, lease=60, slack=60)
    with pytest.raises(BudgetExhausted):
        await budgets.reserve(alpha, "gpt-4o-mini", config, to_nano(Decimal("0.01")), "next")


def test_teams_set_and_show_round_trip_a_config(settings: Settings) -> None:
    # Given a registered team
    env = {
        "QUEUEGATE_NAMESPACE": settings.namespace,
        "QUEUEGATE_DATABASE_SCHEMA": settings.database_schema,
    }
    runner = CliRunner()
    assert runner.invoke(app, ["teams", "add", "alpha"], env=env).exit_code == 0

    # When an operator sets limits, a budget and a model's limits
    set_args = ["teams", "set", "alpha", "--rpm", "100", "--budget", "50"]
    set_args += ["--model", "gpt-4o-mini:tpm=1000,budget=5"]
    assert runner.invoke(app, set_args, env=env).exit_code == 0
    shown = runner.invoke(app, ["teams", "show", "alpha", "--json"], env=env)

    # Expect them back, and the table form to render
    config = json.loads(shown.stdout)
    assert config["rpm"] == 100
    assert Decimal(config["budget_usd"]) == 50
    assert config["models"]["gpt-4o-mini"]["tpm"] == 1000
    table = runner.invoke(app, ["teams", "show", "alpha"], env=env)
    assert table.exit_code == 0 and "gpt-4o-mini" in table.stdout


def test_a_team_s_cache_default_is_switched_on_and_off(settings: Settings) -> None:
    # Given a registered team
    env = {
        "QUEUEGATE_NAMESPACE": settings.namespace,
        "QUEUEGATE_DATABASE_SCHEMA": settings.database_schema,
    }
    runner = CliRunner()
    assert runner.invoke(app, ["teams", "add", "alpha"], env=env).exit_code == 0

    def cache() -> bool:
        shown = runner.invoke(app, ["teams", "show", "alpha", "--json"], env=env)
        return bool(json.loads(shown.stdout)["cache"])

    # When an operator turns its cache default on, then off; expect the config to follow
    assert runner.invoke(app, ["teams", "set", "alpha", "--cache"], env=env).exit_code == 0
    assert cache()
    assert runner.invoke(app, ["teams", "set", "alpha", "--no-cache"], env=env).exit_code == 0
    assert not cache()


def test_an_invalid_setting_is_one_clear_error(settings: Settings) -> None:
    # Given a registered team
    env = {
        "QUEUEGATE_NAMESPACE": settings.namespace,
        "QUEUEGATE_DATABASE_SCHEMA": settings.database_schema,
    }
    runner = CliRunner()
    assert runner.invoke(app, ["teams", "add", "alpha"], env=env).exit_code == 0

    # When an operator sets a negative rate, expect the field named and nothing stored
    result = runner.invoke(app, ["teams", "set", "alpha", "--rpm", "-5"], env=env)
    assert result.exit_code != 0
    assert "rpm" in str(result.exception or result.stdout)


def test_a_model_limit_on_an_alias_the_catalog_lacks_is_refused(settings: Settings) -> None:
    # Given a registered team
    env = {
        "QUEUEGATE_NAMESPACE": settings.namespace,
        "QUEUEGATE_DATABASE_SCHEMA": settings.database_schema,
    }
    assert CliRunner().invoke(app, ["teams", "add", "alpha"], env=env).exit_code == 0

    # When an operator limits a model no catalog alias names, run as an operator runs it
    done = subprocess.run(
        [sys.executable, "-m", "cli", "teams", "set", "alpha", "--model", "nosuchmodel:rpm=5"],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    shown = CliRunner().invoke(app, ["teams", "show", "alpha", "--json"], env=env)

    # Expect one line naming the alias and where aliases come from, and nothing stored
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "'nosuchmodel'" in lines[0] and "QUEUEGATE_CATALOG" in lines[0]
    assert "gpt-4o-mini" in lines[0]  # the aliases there are listed
    assert json.loads(shown.stdout)["models"] == {}


async def test_setting_a_config_keeps_fields_a_newer_gateway_wrote(
    settings: Settings, alpha: str
) -> None:
    # Given a stored config with a field this version does not know
    pool = await create_pool(settings)
    try:
        await pool.execute(
            "UPDATE teams SET config = $2 WHERE name = $1", alpha, {"rpm": 5, "pii": "redact"}
        )

        # When an operator changes the rate and clears nothing else
        await configure(settings, alpha, {"rpm": 10, "tpm": None})

        # Expect the new rate, and the unknown field untouched
        stored = await pool.fetchval("SELECT config FROM teams WHERE name = $1", alpha)
        assert stored["rpm"] == 10
        assert stored["pii"] == "redact"
        assert "tpm" not in stored
    finally:
        await pool.close()


async def test_a_teams_slots_follow_its_rate_limit_live(settings: Settings, alpha: str) -> None:
    # Given team alpha limited to 2 requests a minute: 10 slots (what 2/min admits in 300 s),
    # and a provider slow enough that no job finishes during the test
    await configure(settings, alpha, {"rpm": 2})
    quick = settings.model_copy(update={"teams_refresh": 0.1, "shutdown_grace": 0.2})
    slow = MockConfig(default=Behavior(latency_ms=60_000))
    async with running_gateway(quick, mock_config=slow) as gw, gw.client(alpha) as client:
        # When 30 jobs are queued, the worker holds 10 of them
        for _ in range(30):
            await client.submit(client.job("gpt-4o-mini", HELLO))
        await wait_until(lambda: gw.worker.in_flight == 10)
        assert await _ready(settings, alpha) == 20

        # And when the limit rises to 4 a minute, expect a new consumer with 20 slots without
        # a restart (the old one's 10 jobs stay held until they finish): the queue drains
        await configure(settings, alpha, {"rpm": 4})
        await wait_until(lambda: gw.worker.in_flight == 30)
        assert await _ready(settings, alpha) == 0


async def _ready(settings: Settings, team: str) -> int:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(
            Topology(settings.namespace).team_queue(team), passive=True
        )
        return queue.declaration_result.message_count or 0


@pytest.fixture
async def users(settings: Settings) -> AsyncIterator[list[str]]:
    """Broker users a test may create (``<ns>.alpha``), deleted afterwards."""
    names = [broker_user(settings.namespace, "alpha")]
    yield names
    async with BrokerAdmin.of(settings) as admin:
        for name in names:
            await admin.delete_user(name)


def _cli_env(settings: Settings) -> dict[str, str]:
    return {
        **os.environ,
        "QUEUEGATE_NAMESPACE": settings.namespace,
        "QUEUEGATE_DATABASE_SCHEMA": settings.database_schema,
    }


async def _queuegate(settings: Settings, *args: str, **env: str) -> tuple[int, str, str]:
    """The CLI run with ``args``, ``env`` added to its environment: its status and output."""
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", *args, env=_cli_env(settings) | env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(cli.communicate(), timeout=30)
    assert cli.returncode is not None
    return cli.returncode, stdout.decode(), stderr.decode()


async def test_adding_a_team_again_keeps_its_password(settings: Settings, users: list[str]) -> None:
    # Given team alpha added the default way, its app connected with the password it got
    first = await add(settings, "alpha")
    assert first.amqp_url is not None
    app = await aio_pika.connect(first.amqp_url)

    # When an operator (or Compose, on every up) runs teams add alpha again
    code, stdout, stderr = await _queuegate(settings, "teams", "add", "alpha")

    # Expect no new credentials, said so, and the first password still working
    assert code == 0, stderr
    assert "team alpha exists: its credentials are unchanged" in stdout
    assert "password" not in stdout and "QUEUEGATE_AMQP_URL" not in stdout
    assert not app.is_closed
    await app.close()
    await (await aio_pika.connect(first.amqp_url)).close()


async def test_adding_a_team_never_takes_over_a_broker_user_of_its_name(
    settings: Settings, users: list[str]
) -> None:
    # Given an administrator's broker user that happens to be named as team alpha's would be
    async with BrokerAdmin.of(settings) as admin:
        await admin.put_user(users[0], "the-admins-password", tags="administrator")
        await admin.put_permissions(users[0], configure=".*", write=".*", read=".*")

    # When an operator adds team alpha
    code, stdout, stderr = await _queuegate(settings, "teams", "add", "alpha")

    # Expect a refusal in one line that says what to do, no team, and the user untouched
    assert code != 0, stdout
    assert f"broker user {users[0]} exists and is not team alpha's" in stderr
    assert "rabbitmqctl delete_user" in stderr and len(stderr.strip().splitlines()) == 1
    assert await listing(settings) == []
    url = with_user(settings.amqp_url, users[0], "the-admins-password")
    connection = await aio_pika.connect(url)
    async with connection:
        # ... its permissions too: it still declares what it likes
        await (await connection.channel()).declare_queue(exclusive=True)


async def test_a_team_cannot_take_one_of_the_gateways_own_names(settings: Settings) -> None:
    for name in sorted(RESERVED_NAMES):
        with pytest.raises(ConfigError, match="one of the gateway's own names"):
            await add(settings, name)


async def test_a_failing_management_api_leaves_no_team_behind(settings: Settings) -> None:
    # Given a management API that cannot be reached
    broken = settings.model_copy(update={"management_url": "http://guest:guest@127.0.0.1:1/"})

    # When an operator adds team alpha
    with pytest.raises(ServiceUnavailable, match="management API is not reachable"):
        await add(broken, "alpha")

    # Expect no team registered (no worker serves it) and no queue declared
    assert await listing(settings) == []
    async with BrokerAdmin.of(settings) as admin:
        assert await admin.queue(Topology(settings.namespace).team_queue("alpha")) is None


async def test_a_broker_refusing_the_queue_leaves_no_user_and_no_team(
    settings: Settings, users: list[str]
) -> None:
    # Given a management API that works and an AMQP URL that does not
    broken = settings.model_copy(update={"amqp_url": "amqp://guest:guest@127.0.0.1:1/"})

    # When an operator adds team alpha
    with pytest.raises(ServiceUnavailable):
        await add(broken, "alpha")

    # Expect the broker user made first deleted again, and no team registered
    async with BrokerAdmin.of(settings) as admin:
        assert not await admin.user_exists(users[0])
    assert await listing(settings) == []


async def test_a_teams_broker_user_cannot_open_more_connections_than_its_limit(
    settings: Settings, users: list[str]
) -> None:
    # Given team alpha added the default way: its user gets the gateway's default limits
    credentials = await add(settings, "alpha")
    assert credentials.amqp_url is not None
    async with BrokerAdmin.of(settings) as admin:
        assert await admin.user_limits(users[0]) == {
            "max-connections": settings.team_max_connections,
            "max-channels": settings.team_max_channels,
        }

    # When an operator lowers its connections to 2, and its app opens a third
    code, _, stderr = await _queuegate(settings, "teams", "set", "alpha", "--max-connections", "2")
    assert code == 0, stderr
    opened = [await aio_pika.connect(credentials.amqp_url) for _ in range(2)]
    try:
        # Expect the broker to refuse the third, and teams show to say the limit
        with pytest.raises(aio_pika.exceptions.AMQPError):
            await aio_pika.connect(credentials.amqp_url)
    finally:
        for connection in opened:
            await connection.close()
    code, stdout, stderr = await _queuegate(settings, "teams", "show", "alpha")
    assert code == 0, stderr
    assert f"{users[0]}: 2 connections" in " ".join(stdout.split())


async def test_adding_a_team_whose_broker_user_was_deleted_makes_it_again(
    settings: Settings, users: list[str]
) -> None:
    # Given team alpha added the default way, then its broker user deleted by hand
    await add(settings, "alpha")
    async with BrokerAdmin.of(settings) as admin:
        await admin.delete_user(users[0])

    # When an operator adds it again
    again = await register(settings, "alpha")

    # Expect a new password that works, and the user's limits set again
    assert not again.created and again.credentials.amqp_url is not None
    await (await aio_pika.connect(again.credentials.amqp_url)).close()
    async with BrokerAdmin.of(settings) as admin:
        assert (await admin.user_limits(users[0]))["max-connections"] == 64


def test_the_definitions_default_policies_bound_as_teams_add_does() -> None:
    # Given deploy/rabbitmq/definitions.json, the bounds of a broker before any teams add
    definitions = json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text())
    policies = {p["name"]: p["definition"] for p in definitions["policies"]}
    defaults = Settings()

    # Expect them to be the gateway's defaults, as teams add puts them
    assert policies["queuegate-team-queues"] == {
        "max-length": defaults.max_queue_length,
        "max-length-bytes": defaults.max_queue_bytes,
        "overflow": "reject-publish",
    }
    assert policies[control_policy(defaults)] == {
        "max-length-bytes": CONTROL_MAX_BYTES,
        "overflow": "reject-publish",
    }
    assert policies[reply_policy(defaults)] == Bound.of(defaults).policy()
    [replies] = [p for p in definitions["policies"] if p["name"] == reply_policy(defaults)]
    assert replies["pattern"] == Topology(defaults.namespace).team_reply_queues_pattern()


async def test_a_teams_quota_outranks_the_default_policies_of_the_definitions(
    settings: Settings, alpha: str
) -> None:
    # Given default policies on every team queue like deploy/rabbitmq/definitions.json's,
    # named to sort before and after the quota's, so a tie on priority would pick one of them
    definitions = json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text())
    [default] = [p for p in definitions["policies"] if p["name"] == "queuegate-team-queues"]
    pattern = default["pattern"].replace("queuegate", re.escape(settings.namespace), 1)
    names = [f"{settings.namespace}-a-defaults", f"{settings.namespace}-z-defaults"]
    async with BrokerAdmin.of(settings) as admin:
        for name in names:
            await admin.put_policy(
                name,
                pattern=pattern,
                definition=default["definition"],
                priority=default["priority"],
            )
        try:
            # When an operator sets the team's queue quota
            await configure(settings, alpha, {"max_queue_length": 5})

            # Expect the quota to hold: the broker refuses the job after the fifth (or sixth),
            # once it applies the policy (a quorum queue's leader takes a policy's change
            # moments after the broker stores it: the queue emptied once a job is refused)
            topology = Topology(settings.namespace)
            connection = await aio_pika.connect(settings.amqp_url)
            async with connection:
                channel = await connection.channel(publisher_confirms=True)
                jobs = await channel.get_exchange(topology.jobs_exchange)
                queue = await channel.get_queue(topology.team_queue(alpha), ensure=False)
                counts = []
                for _ in range(2):
                    accepted = 0
                    with pytest.raises(aio_pika.exceptions.DeliveryError):
                        for _ in range(100):
                            await jobs.publish(aio_pika.Message(b"{}"), routing_key=alpha)
                            accepted += 1
                    counts.append(accepted)
                    await queue.purge()
            assert counts[-1] in (5, 6)
            # deliberately, not by a tie the broker breaks as it likes: a higher priority
            quota = await admin.policy(quota_policy(settings, alpha))
            assert quota is not None
            assert quota["priority"] > max(p["priority"] for p in definitions["policies"])
        finally:
            for name in names:
                await admin.delete_policy(name)


async def _channels_counted(user: str, count: int) -> None:
    """Wait until the broker's channel tracking, which its per-user limit reads, counts
    ``count`` channels of ``user``."""
    erlang = f'rabbit_channel_tracking:count_tracked_items_in({{user, <<"{user}">>}}).'
    async with asyncio.timeout(30):
        while True:
            counted = await asyncio.create_subprocess_exec(
                "rabbitmqctl", "eval", erlang, stdout=subprocess.PIPE
            )
            out, _ = await counted.communicate()
            if out.strip() == str(count).encode():
                return
            await asyncio.sleep(0.1)


async def test_a_teams_broker_user_cannot_open_more_channels_than_its_limit(
    settings: Settings, users: list[str]
) -> None:
    # Given team alpha added the default way, its channels limited to 2
    credentials = await add(settings, "alpha")
    assert credentials.amqp_url is not None and credentials.user is not None
    await configure(settings, "alpha", {"max_channels": 2})

    # When its app opens a third channel on one connection, once the broker counts the two
    # it has (it tracks channels from their creation events, behind their opening: a full
    # run under load once opened the third before the two were counted)
    connection = await aio_pika.connect(credentials.amqp_url)
    async with connection:
        await connection.channel()
        await connection.channel()
        await _channels_counted(credentials.user, 2)

        # Expect the broker to refuse it
        with pytest.raises(aio_pika.exceptions.AMQPError):
            await connection.channel()


async def test_a_shared_queue_the_broker_has_otherwise_is_the_one_named(
    settings: Settings, users: list[str]
) -> None:
    # Given the namespace's dead-letter queue declared with another replica count (as by
    # processes started with another QUEUEGATE_QUORUM_REPLICAS)
    dead = Topology(settings.namespace).dead_queue
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(
            dead,
            durable=True,
            arguments={"x-queue-type": "quorum", "x-quorum-initial-group-size": 1},
        )
        # When an operator adds team alpha
        code, _, stderr = await _queuegate(settings, "teams", "add", "alpha")
        await declared.delete(if_unused=False, if_empty=False)
    # Expect the line to name the queue that differs, not the team's (which does not exist)
    assert code == 1
    assert f"already has queue {dead} with other arguments" in stderr, stderr
    assert f"rabbitmqctl delete_queue {dead}" in stderr


async def test_a_queue_the_broker_already_has_otherwise_is_one_line_that_says_what_to_do(
    settings: Settings, users: list[str]
) -> None:
    # Given the team's queue declared beforehand as a classic queue with other arguments
    queue = Topology(settings.namespace).team_queue("alpha")
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, arguments={"x-max-length": 5})

        # When an operator adds team alpha
        code, _, stderr = await _queuegate(settings, "teams", "add", "alpha")
        await declared.delete(if_unused=False, if_empty=False)

    # Expect one line naming the queue and the way out, and nothing left behind
    assert code == 1
    assert stderr.strip().count("\n") == 0, stderr
    assert f"already has queue {queue} with other arguments" in stderr
    assert f"rabbitmqctl delete_queue {queue}" in stderr
    async with BrokerAdmin.of(settings) as admin:
        assert not await admin.user_exists(users[0])
    assert await listing(settings) == []


async def test_a_database_error_of_any_command_is_one_line(settings: Settings) -> None:
    # Given a database schema that was never migrated
    unmigrated = settings.model_copy(update={"database_schema": f"{settings.database_schema}_x"})

    # When an operator reads usage from it
    code, _, stderr = await _queuegate(unmigrated, "usage")

    # Expect one line that says what to do, not a traceback
    assert code == 1
    assert stderr.strip().count("\n") == 0, stderr
    assert "PostgreSQL refused the request" in stderr and "queuegate migrate" in stderr


async def test_budgets_in_scientific_notation_are_stored_and_read_plain(
    settings: Settings,
) -> None:
    # Given a registered team
    env = _cli_env(settings)
    runner = CliRunner()

    async def cli(*args: str) -> Any:
        return await asyncio.to_thread(runner.invoke, app, list(args), env=env)

    await add(settings, "alpha", identity="queue")

    async def stored() -> str:
        pool = await create_pool(settings)
        try:
            value: str = await pool.fetchval(
                "SELECT config->>'budget_usd' FROM teams WHERE name = 'alpha'"
            )
            return value
        finally:
            await pool.close()

    # When an operator sets a tiny budget, expect it stored and shown positionally
    done = await cli("teams", "set", "alpha", "--budget", "0.0000000001")
    assert done.exit_code == 0, done.output
    assert await stored() == "0.0000000001"
    shown = await cli("teams", "show", "alpha")
    assert "0.0000000001" in shown.stdout and "E-10" not in shown.stdout

    # When an operator writes one in scientific notation, expect it stored plain
    done = await cli("teams", "set", "alpha", "--budget", "1E+3")
    assert done.exit_code == 0, done.output
    assert await stored() == "1000"

    # Given a budget an older version stored as "1E+3": status reads it all the same
    pool = await create_pool(settings)
    try:
        await pool.execute(
            "UPDATE teams SET config = config || '{\"budget_usd\": \"1E+3\"}' WHERE name = 'alpha'"
        )
    finally:
        await pool.close()
    as_json = await cli("status", "--json", "--teams", "alpha")
    assert as_json.exit_code == STALE_EXIT, as_json.output  # stale: no worker runs
    [team] = json.loads(as_json.stdout)["teams"]
    assert team["budget_usd"] == "1000"
    table = await cli("status", "--teams", "alpha")
    assert "$1,000" in table.stdout, table.stdout


async def test_a_registry_read_sees_a_change_only_once_it_committed_before_the_read(
    settings: Settings, alpha: str
) -> None:
    pool = await create_pool(settings)
    try:
        # Given a change of alpha's config in flight (its transaction not committed yet)
        changing, committing = asyncio.Event(), asyncio.Event()

        async def commit_later() -> None:
            changing.set()
            await committing.wait()

        write = asyncio.create_task(
            set_team_config(pool, alpha, TeamConfig(rpm=7), before_commit=commit_later)
        )
        await changing.wait()
        # When the registry is read meanwhile, then once the change committed
        during = await read_registry(pool)
        committing.set()
        change = await write
        after = await read_registry(pool)
    finally:
        await pool.close()

    # Expect the first read not to see the change (its rows are alpha's old config), the
    # second to see it
    assert change is not None
    assert [team.config.rpm for team in during.teams] == [None]
    assert not sees(during.version, change)
    assert [team.config.rpm for team in after.teams] == [7]
    assert sees(after.version, change)


async def _serving(settings: Settings, names: list[str]) -> list[str]:
    """The names of workers, once each has recorded the registry version it serves under (a
    worker is then one ``teams set`` waits for)."""
    client = redis_for(settings)
    try:
        async with asyncio.timeout(30):
            while True:
                snapshots = (await read_workers(client, Keys(settings.redis_prefix))).snapshots
                if all(snapshots.get(name, {}).get("registry") for name in names):
                    return names
                # No event announces another process's snapshot.
                await asyncio.sleep(0.05)
    finally:
        await client.aclose()


class _Workers(NamedTuple):
    mock: MockProvider
    processes: list[asyncio.subprocess.Process]
    names: list[str]


@asynccontextmanager
async def _two_workers(settings: Settings, team: str, **env: str) -> AsyncIterator[_Workers]:
    """Two worker processes serving ``team`` (``env`` added to their environment), the mock
    provider they call, and their names once each serves under a registry version."""
    async with MockProvider() as mock:
        processes = [
            await start_worker(worker_env(settings, mock, **env), [team]) for _ in range(2)
        ]
        try:
            names = [f"{socket.gethostname()}:{process.pid}" for process in processes]
            yield _Workers(mock, processes, await _serving(settings, names))
        finally:
            await stop_workers(processes)


async def test_teams_set_returns_once_every_worker_serves_under_it(
    settings: Settings, alpha: str
) -> None:
    # Given two worker processes serving alpha, their registry read again only every ten
    # minutes (the change reaches them by its notification alone)
    async with _two_workers(settings, alpha, QUEUEGATE_TEAMS_REFRESH="600") as workers:
        # When an operator sets a zero budget
        code, stdout, stderr = await _queuegate(settings, "teams", "set", alpha, "--budget", "0")

        # Expect it to return once both serve under it, and the jobs sent right after (to
        # both workers, in turn) refused, the provider never called
        assert code == 0, stderr
        assert f"team {alpha}: in force on every live worker (2)" in stdout
        async with GatewayClient(settings, team=alpha) as client:
            results = await asyncio.gather(
                *(client.chat("gpt-4o-mini", HELLO, timeout=10) for _ in range(4))
            )
    assert [r.error.code if r.error else r.status for r in results] == ["budget_exhausted"] * 4
    assert workers.mock.stats.calls == 0


async def test_teams_set_names_a_stalled_worker_and_ends_within_its_wait(
    settings: Settings, alpha: str
) -> None:
    # Given two worker processes serving alpha, whose snapshots stay live 30 s past their last
    # (so the one stalled below is still a live worker while the command runs)
    async with _two_workers(settings, alpha, QUEUEGATE_STATS_INTERVAL="10") as workers:
        stalled, serving = workers.names

        # When one is stalled (SIGSTOP) and an operator sets alpha's rate, waiting 2 s
        os.kill(workers.processes[0].pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            code, stdout, stderr = await _queuegate(
                settings, "teams", "set", alpha, "--rpm", "10", "--wait", "2"
            )
            took = time.monotonic() - started
        finally:
            os.kill(workers.processes[0].pid, signal.SIGCONT)

        # Expect the change stored, the wait said, and the command to end after its 2 s (and
        # its start: a few seconds on a busy machine) with exit 3, naming the stalled worker
        # alone
        assert f'team {alpha}: {{"rpm":10}}' in stdout
        assert "waiting up to 2 s for 1 of 2 workers to apply the change" in stderr
        assert code == 3, stderr
        said = stderr.splitlines()[-1]
        assert f"1 of 2 live workers did not confirm serving under it within 2 s: {stalled} " in (
            said
        )
        assert serving not in said
        assert took < 12

        # When it runs again, expect it to serve under the change, as the next command says
        code, stdout, stderr = await _queuegate(settings, "teams", "set", alpha, "--rpm", "10")
        assert code == 0, stderr
        assert f"team {alpha}: in force on every live worker (2)" in stdout


async def test_teams_set_right_after_redis_lost_its_data_waits_for_the_workers_to_report(
    settings: Settings, alpha: str, redis_client: aioredis.Redis
) -> None:
    # Given a worker process serving alpha, reaching PostgreSQL through a proxy, its registry
    # read again only every ten minutes and its live stats written every minute (so that
    # only the change below makes it write its live entry again), told of a first change
    async with MockProvider() as mock, TcpProxy(settings.database_url) as pg_proxy:
        env = worker_env(
            settings,
            mock,
            QUEUEGATE_DATABASE_URL=pg_proxy.url,
            QUEUEGATE_TEAMS_REFRESH="600",
            QUEUEGATE_STATS_INTERVAL="60",
        )
        process = await start_worker(env, [alpha])
        try:
            await _serving(settings, [f"{socket.gethostname()}:{process.pid}"])
            configured = await configure(settings, alpha, {"rpm": 5})
            assert (await in_force(settings, configured.change, 10)).pending == []

            # When Redis loses every key of the namespace, its live entry with them, and an
            # operator sets alpha's rate before the worker has applied it (PostgreSQL's
            # answers, the change's notification among them, held from it until the command
            # has first looked for live workers)
            pg_proxy.hang_replies()
            async for key in redis_client.scan_iter(match=f"{settings.redis_prefix}:*"):
                await redis_client.delete(key)
            cli = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "cli", "teams", "set", alpha, "--rpm", "10"),
                env=_cli_env(settings),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            assert cli.stderr is not None
            first = (await asyncio.wait_for(cli.stderr.readline(), timeout=30)).decode()
            pg_proxy.release_replies()
            stdout, stderr = await asyncio.wait_for(cli.communicate(), timeout=30)
        finally:
            await pg_proxy.up()
            await stop_workers([process])

    # Expect it confirmed by the worker, not said that none runs, once it said that it looks
    # for workers to report
    assert cli.returncode == 0, first + stderr.decode()
    assert f"team {alpha}: in force on every live worker (1)" in stdout.decode()
    assert f"team {alpha}: no live worker found yet; waiting up to 2 s for workers" in first


async def test_teams_set_with_no_worker_running_says_so_without_looking_for_reports(
    settings: Settings, alpha: str
) -> None:
    # Given no worker running, when an operator sets alpha's rate
    code, stdout, stderr = await _queuegate(settings, "teams", "set", alpha, "--rpm", "10")

    # Expect the change stored, and said at once that no worker runs: PostgreSQL holds no
    # worker's connection, so the command does not look for workers to report
    assert code == 0, stderr
    assert f"team {alpha}: no worker is running; each reads it as it starts" in stdout
    assert "waiting" not in stderr, stderr


async def test_teams_set_with_a_worker_connected_but_not_reporting_is_not_confirmed(
    settings: Settings, alpha: str
) -> None:
    # Given a worker of this namespace connected to PostgreSQL that reports nothing to Redis
    # (stalled, draining, or cut off from Redis), as its connection shows it
    conn = await asyncpg.connect(
        settings.database_url,
        server_settings={"application_name": worker_application_name(settings.namespace)},
    )
    try:
        # When an operator sets alpha's rate
        code, stdout, stderr = await _queuegate(settings, "teams", "set", alpha, "--rpm", "10")
    finally:
        await conn.close()

    # Expect the change stored but not confirmed (exit 3), saying why, never that no worker
    # is running: one is
    assert code == 3, stdout + stderr
    assert "the change is stored, but no worker reported serving under it" in stderr
    assert "PostgreSQL holds 1 of the namespace's worker connections (stalled" in stderr
    assert "no worker is running" not in stdout + stderr


async def test_a_worker_of_another_namespace_connected_to_postgresql_is_not_looked_for(
    settings: Settings, alpha: str
) -> None:
    # Given a worker running in another namespace whose name starts with this one's (its own
    # schema), connected to PostgreSQL as its namespace's worker
    other = settings.model_copy(
        update={
            "namespace": f"{settings.namespace}-x",
            "database_schema": f"{settings.database_schema}_x",
        }
    )
    said: list[tuple[int, int]] = []
    try:
        async with running_gateway(other, accounting=False):
            assert await workers_connected(other)

            # When alpha's rate is set in this namespace, waiting up to 5 s for its workers
            configured = await configure(settings, alpha, {"rpm": 5})
            confirmed = await in_force(
                settings, configured.change, 5, lambda *counts: said.append(counts)
            )
    finally:
        await drop_test_namespace(other, TEST_TEAMS)

    # Expect none found, and none looked for (PostgreSQL holds none of this namespace's)
    assert confirmed == InForce(workers=[], pending=[], looked=0.0, connected=0)
    assert said == []


def test_a_long_namespace_names_its_workers_apart_within_postgresqls_limit() -> None:
    # Given two namespaces of the longest kind, alike but for their last character
    first, second = "n" * 63 + "a", "n" * 63 + "b"

    # Expect their workers' application names apart, each kept whole by PostgreSQL
    names = {worker_application_name(first), worker_application_name(second)}
    assert len(names) == 2
    assert all(len(name.encode()) <= 63 for name in names)


WAIT_BOUND = 2 + 4
"""Seconds a team's change with ``--wait 2`` may take in all, its start on a loaded machine
included: the services' own timeouts, which a frozen one runs out, add up to 11 s."""


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["set", "--rpm", "10"], "the change is stored, but no worker's confirmation was read"),
        # A first budget, whose spend ledger is brought up to date in Redis once it is stored
        (["set", "--budget", "5"], "'s budget is set, but its spend ledger is not brought up"),
        (["disable"], "is disabled, but its dashboard sessions are not ended"),
    ],
)
async def test_a_teams_change_ends_within_its_wait_while_redis_hangs(
    settings: Settings, alpha: str, args: list[str], said: str
) -> None:
    # Given Redis frozen (it takes connections and never answers, as under SIGSTOP)
    command, *options = args
    async with TcpProxy(settings.redis_url) as proxy:
        proxy.hang()

        # When an operator changes alpha, waiting 2 s
        started = time.monotonic()
        code, _, stderr = await _queuegate(
            settings, "teams", command, alpha, *options, "--wait", "2",
            QUEUEGATE_REDIS_URL=proxy.url,
        )  # fmt: skip
        took = time.monotonic() - started

    # Expect the change stored, and said in one line to be unconfirmed, Redis named, by the
    # end of the wait
    assert code == 3, stderr
    assert stderr.strip().startswith(f"team {alpha}") and said in stderr, stderr
    assert f"Redis is not reachable at {proxy.url}" in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert took < WAIT_BOUND


async def test_teams_set_ends_within_its_wait_while_postgresql_hangs_asked_for_workers(
    settings: Settings, alpha: str
) -> None:
    # Given no worker reporting, and PostgreSQL frozen once asked for the namespace's workers
    async with TcpProxy(settings.database_url) as proxy:
        proxy.hang_at(b"pg_stat_activity")

        # When an operator sets alpha's rate, waiting 2 s
        started = time.monotonic()
        code, stdout, stderr = await _queuegate(
            settings, "teams", "set", alpha, "--rpm", "10", "--wait", "2",
            QUEUEGATE_DATABASE_URL=proxy.url,
        )  # fmt: skip
        took = time.monotonic() - started
        assert proxy.hung.is_set()

    # Expect the change stored, and said to be unconfirmed, PostgreSQL named as not
    # answering in time, by the end of the wait
    assert f'team {alpha}: {{"rpm":10}}' in stdout
    assert code == 3, stderr
    said = stderr.splitlines()[-1]
    assert said.startswith(f"team {alpha}: the change is stored, but no worker reported"), said
    assert f"PostgreSQL at {redact_url(proxy.url)} did not answer in time whether any" in said
    assert took < WAIT_BOUND


async def test_a_first_budget_with_postgresql_hung_reading_its_spend_blames_no_redis(
    settings: Settings, alpha: str
) -> None:
    # Given PostgreSQL frozen once the command reads alpha's spend for its first budget's
    # ledger (Redis answering)
    async with TcpProxy(settings.database_url) as proxy:
        proxy.hang_at(b"coalesce(sum(cost_usd)")

        # When an operator sets alpha's first budget, waiting 2 s
        started = time.monotonic()
        code, _, stderr = await _queuegate(
            settings, "teams", "set", alpha, "--budget", "5", "--wait", "2",
            QUEUEGATE_DATABASE_URL=proxy.url,
        )  # fmt: skip
        took = time.monotonic() - started
        assert proxy.hung.is_set()

    # Expect the budget stored and said unconfirmed in one line by the end of the wait, with
    # PostgreSQL among what did not answer, not an operator sent to start a Redis that runs
    assert code == 3, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert "PostgreSQL" in stderr and "did not answer" in stderr, stderr
    assert "Redis is not reachable" not in stderr, stderr
    assert took < WAIT_BOUND
    [team] = [team for team in await listing(settings) if team.name == alpha]
    assert team.config.budget_usd == 5


@pytest.mark.parametrize(
    ("args", "hang_at", "said"),
    [
        # Its UPDATE sent in a transaction never committed, which PostgreSQL rolls back
        (["set", "--rpm", "10"], b"UPDATE teams", "is NOT stored"),
        (["disable"], b"SELECT", "is NOT stored"),  # before any write
        # A statement committed as it runs: once sent, it may have landed
        (["disable"], b"UPDATE teams", "may or may not be stored"),
    ],
)
async def test_a_teams_change_ends_when_postgresql_hangs_before_it_is_stored(
    settings: Settings, alpha: str, args: list[str], hang_at: bytes, said: str
) -> None:
    # Given PostgreSQL frozen once the command sends the first statement holding ``hang_at``
    command, *options = args
    async with TcpProxy(settings.database_url) as proxy:
        proxy.hang_at(hang_at)

        # When an operator changes alpha
        started = time.monotonic()
        code, stdout, stderr = await _queuegate(
            settings, "teams", command, alpha, *options, QUEUEGATE_DATABASE_URL=proxy.url
        )
        took = time.monotonic() - started
        assert proxy.hung.is_set()

    # Expect one line saying whether the change is stored, and what to do, with the status
    # of a change refused, once the store's bound has passed
    assert code == 1, stdout + stderr
    assert stderr.strip() == stderr.strip().splitlines()[0], stderr
    assert stderr.startswith(f"team {alpha}: the change {said}: PostgreSQL"), stderr
    assert took < STORE_WAIT + 4
    if said == "is NOT stored":
        [team] = [team for team in await listing(settings) if team.name == alpha]
        assert team.enabled and team.config.rpm is None


async def test_teams_disable_never_writes_without_telling_the_running_processes(
    settings: Settings, alpha: str
) -> None:
    # Given PostgreSQL frozen once the command sends the notification of alpha's change
    async with TcpProxy(settings.database_url) as proxy:
        proxy.hang_at(b"pg_notify")

        # When an operator disables alpha
        code, stdout, stderr = await _queuegate(
            settings, "teams", "disable", alpha, QUEUEGATE_DATABASE_URL=proxy.url
        )
        assert proxy.hung.is_set()

    # Expect it said in one line that the change may or may not be stored, and the write not
    # made without its notification (sent apart, the team was disabled with the running
    # workers and front doors never told, serving it until their next re-read)
    assert code == 1, stdout + stderr
    assert stderr.startswith(f"team {alpha}: the change may or may not be stored"), stderr
    [team] = [team for team in await listing(settings) if team.name == alpha]
    assert team.enabled


async def test_teams_add_with_the_broker_hung_declaring_its_queue_says_it_is_not_stored(
    settings: Settings,
) -> None:
    # Given RabbitMQ frozen once the command declares the new team's queue (the last step
    # before its transaction commits)
    async with TcpProxy(settings.amqp_url) as proxy:
        proxy.hang_at(Topology.of(settings).team_queue("beta").encode())

        # When an operator adds team beta
        started = time.monotonic()
        code, stdout, stderr = await _queuegate(
            settings, "teams", "add", "beta", "--identity", "api_key",
            QUEUEGATE_AMQP_URL=proxy.url,
        )  # fmt: skip
        took = time.monotonic() - started
        assert proxy.hung.is_set()

    # Expect one line saying it is not stored (its transaction never committed), naming the
    # broker among what did not answer, once the store's bound has passed; and no team beta
    assert code == 1, stdout + stderr
    assert stderr.strip() == stderr.strip().splitlines()[0], stderr
    assert stderr.startswith("team beta: the change is NOT stored: PostgreSQL (or the broker)")
    assert took < STORE_WAIT + 4
    assert "beta" not in [team.name for team in await listing(settings)]


async def test_a_worker_stopping_cleanly_is_neither_awaited_nor_named_while_it_drains(
    settings: Settings, alpha: str, redis_client: aioredis.Redis
) -> None:
    # Given two worker processes serving alpha, whose snapshots stay live 30 s past their last
    # (as a snapshot a stopped worker left would, unwithdrawn), the first holding a job at a
    # model that hangs for a minute, with 3 s to drain it at a stop
    slow = MockConfig(default=Behavior(timeout_rate=1, hang_s=60))
    async with MockProvider(slow) as mock:
        env = worker_env(settings, mock, QUEUEGATE_STATS_INTERVAL="10")
        env["QUEUEGATE_SHUTDOWN_GRACE"] = "3"
        stopping = await start_worker(env, [alpha])
        processes = [stopping]
        try:
            stopping_name = f"{socket.gethostname()}:{stopping.pid}"
            await _serving(settings, [stopping_name])
            async with GatewayClient(settings, team=alpha) as client:
                await client.submit(client.job("gpt-4o-mini", HELLO))
            async with asyncio.timeout(20):
                await mock.wait_for_calls(1)
            serving = await start_worker(env, [alpha])
            processes.append(serving)
            serving_name = f"{socket.gethostname()}:{serving.pid}"
            await _serving(settings, [serving_name])

            # When the first is sent SIGTERM, and an operator sets alpha's rate while it
            # drains its job
            stopping.send_signal(signal.SIGTERM)
            code, stdout, stderr = await _queuegate(
                settings, "teams", "set", alpha, "--rpm", "10", "--wait", "2"
            )

            # Expect the change confirmed by the worker that serves, the stopping one not
            # waited for nor named, though it still runs
            assert code == 0, stderr
            assert f"team {alpha}: in force on every live worker (1)" in stdout
            assert stopping_name not in stdout + stderr
            assert stopping.returncode is None

            # ... and once it has stopped, its live entry gone, not left to lapse
            await asyncio.wait_for(stopping.wait(), timeout=30)
            assert stopping.returncode == 0
            live = await read_workers(redis_client, Keys(settings.redis_prefix))
            assert stopping_name not in live.listed
            assert serving_name in live.snapshots
        finally:
            await stop_workers(processes)


async def _draining(reader: StatusReader, team: str, name: str) -> Status:
    """The status of ``team`` once it shows the worker ``name`` draining (its snapshot,
    written by another process, arrives unannounced)."""
    async with asyncio.timeout(20):
        while True:
            status = await reader.read([team])
            if name in {d.worker for d in status.draining}:
                return status
            await asyncio.sleep(0.05)


async def test_status_shows_a_worker_draining_with_its_jobs_in_flight_until_its_drain_ends(
    settings: Settings, alpha: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    # Given the one worker process serving alpha, whose snapshot stays live 30 s past its
    # last (so one left behind would still show), holding a job at a model that hangs for
    # two minutes, with a minute to drain it at a stop
    slow = MockConfig(default=Behavior(timeout_rate=1, hang_s=120))
    keys = Keys(settings.redis_prefix)
    env_extra = {"QUEUEGATE_STATS_INTERVAL": "10", "QUEUEGATE_SHUTDOWN_GRACE": "60"}
    worker: asyncio.subprocess.Process | None = None
    try:
        async with MockProvider(slow) as mock, StatusReader(settings) as reader:
            # (its log kept: a full run once saw its drain outlast the wait below)
            log = tmp_path / "worker.log"
            worker = await start_worker(worker_env(settings, mock, **env_extra), [alpha], log=log)
            name = f"{socket.gethostname()}:{worker.pid}"
            await _serving(settings, [name])
            async with GatewayClient(settings, team=alpha) as client:
                await client.submit(client.job("gpt-4o-mini", HELLO))
            async with asyncio.timeout(20):
                await mock.wait_for_calls(1)

            # When it is sent SIGTERM
            worker.send_signal(signal.SIGTERM)

            # Expect the status to show it draining with its job in flight, not serving, and
            # current (a worker reports), as `queuegate status --json` says too
            during = await _draining(reader, alpha, name)
            assert (during.workers, during.draining, during.reason) == (
                0,
                [DrainingWorker(name, 1)],
                None,
            )
            assert [t.in_flight for t in during.teams] == [1]
            code, stdout, stderr = await _queuegate(settings, "status", "--json", "--teams", alpha)
            assert code == 0, stderr
            shown = json.loads(stdout)
            assert (shown["workers"], shown["stale"]) == (0, False)
            assert shown["draining"] == [{"worker": name, "in_flight": 1}]

            # When an operator sets alpha's rate as it drains, expect no wait for it past
            # the look for reports (no worker serves), and the change stored but not said
            # to be in force nor that no worker runs: it still runs, and shows draining
            code, stdout, stderr = await _queuegate(
                settings, "teams", "set", alpha, "--rpm", "10", "--wait", "20"
            )
            assert code == 3, stdout + stderr
            assert "no worker reported serving under it within 2 s" in stderr
            assert "worker connections (stalled, draining, or cut off from Redis)" in stderr
            assert "no worker is running" not in stdout + stderr
            assert name not in stdout + stderr
            assert worker.returncode is None
            assert (await reader.read([alpha])).draining == [DrainingWorker(name, 1)]
        # (the mock stopped: its hang ends, so does the worker's call and its drain)
        try:
            await asyncio.wait_for(worker.wait(), timeout=30)
        except TimeoutError:
            raise AssertionError(f"the drain outlasted 30 s; its log:\n{log.read_text()}") from None
        assert worker.returncode == 0

        # Expect it gone once its drain has ended, its entry removed, not left to lapse
        async with StatusReader(settings) as reader:
            after = await reader.read([alpha])
        assert (after.workers, after.draining, after.reason) == (0, [], NO_WORKER)
        assert await redis_client.exists(keys.live_worker(name)) == 0
    finally:
        if worker is not None:
            await stop_workers([worker])


async def test_a_draining_worker_sends_its_jobs_held_for_the_rate_back_uncalled(
    settings: Settings, alpha: str
) -> None:
    # Given alpha at 6 requests a minute, one at a time (a job admitted every 10 s), a worker
    # serving it with 30 s to drain at a stop, and another worker (of team beta)
    await configure(settings, alpha, {"rpm": 6, "burst": 1})
    await register(settings, "beta", identity="queue")  # a worker serves registered teams alone
    slow = MockConfig(models={"llama-3.1-8b": Behavior(timeout_rate=1, hang_s=60)})
    async with MockProvider(slow) as mock:
        env = worker_env(settings, mock, QUEUEGATE_SHUTDOWN_GRACE="30")
        processes = [await start_worker(env, [alpha]), await start_worker(env, ["beta"])]
        stopping = processes[0]
        try:
            await _serving(settings, [f"{socket.gethostname()}:{p.pid}" for p in processes])
            # ... the first holding a job at a model that hangs, until its deadline 15 s on
            # (which keeps the worker draining), and two jobs waiting for alpha's bucket
            async with GatewayClient(settings, team=alpha) as client:
                await client.submit(
                    client.job("local-llama", HELLO, deadline=timedelta(seconds=15))
                )
                async with asyncio.timeout(20):
                    await mock.wait_for_calls(1)
                for _ in range(2):
                    await client.submit(client.job("gpt-4o-mini", HELLO))
            async with asyncio.timeout(10):
                while True:  # all three delivered to the worker
                    if not await _ready(settings, alpha):
                        break
                    await asyncio.sleep(0.05)  # polled: the broker announces no delivery

            # When the first is sent SIGTERM, and an operator disables alpha as it drains
            stopping.send_signal(signal.SIGTERM)
            code, stdout, stderr = await _queuegate(settings, "teams", "disable", alpha)
            in_force = time.monotonic()
            assert code == 0, stderr
            assert f"team {alpha}: in force on every live worker (1)" in stdout

            # Expect no call of the waiting jobs once the change was in force (the draining
            # worker admits none of them under the config it had): both back in alpha's
            # queue, uncalled, once it stopped
            await asyncio.wait_for(stopping.wait(), timeout=40)
            assert stopping.returncode == 0
            late = [r for r in mock.requests if r.model == "gpt-4o-mini" and r.t >= in_force]
            assert late == []
            assert await _ready(settings, alpha) == 2
        finally:
            await stop_workers(processes)


async def test_teams_disable_returns_once_no_worker_serves_the_team(
    settings: Settings, alpha: str
) -> None:
    # Given a worker serving alpha
    async with running_gateway(settings) as gw:
        await _serving(settings, [gw.worker.name])

        # When an operator disables alpha
        code, stdout, stderr = await _queuegate(settings, "teams", "disable", alpha)

        # Expect it to return once the worker consumes alpha's queue no more
        assert code == 0, stderr
        assert f"team {alpha}: in force on every live worker (1)" in stdout
        assert gw.worker.teams == []


async def test_a_worker_of_an_earlier_version_is_named_and_one_that_lapsed_is_not_awaited(
    settings: Settings, alpha: str, redis_client: aioredis.Redis
) -> None:
    keys = Keys(settings.redis_prefix)
    async with running_gateway(settings) as gw:
        await _serving(settings, [gw.worker.name])
        # Given, besides it, a worker of an earlier version (its snapshot, renewed, names no
        # registry version) and one that died a minute ago (listed, its snapshot expired)
        now = time.time()
        earlier = {"in_flight": {}, "bucket_fill": {}, "deployments": [], "ts": now}
        await redis_client.set(keys.live_worker("earlier:1"), json.dumps(earlier), ex=30)
        await redis_client.zadd(keys.live_workers, {"earlier:1": now, "dead:2": now - 60})
        try:
            # When alpha's rate changes and its operator waits a second for the workers
            configured = await configure(settings, alpha, {"rpm": 5})
            confirmed = await in_force(settings, configured.change, 1)
        finally:
            await redis_client.delete(keys.live_workers, keys.live_worker("earlier:1"))

    # Expect the earlier one named, not the dead one waited for
    assert confirmed == InForce(
        workers=["earlier:1", gw.worker.name], pending=["earlier:1"], looked=0.0
    )


CUT_OFF_WAIT = 3.0
"""Seconds a worker back in Redis but cut off from PostgreSQL is watched answering no job."""


async def _shown(settings: Settings, name: str, *, live: bool) -> None:
    """Once the worker's live snapshot is in Redis (``live``), or no longer is."""
    client = redis_for(settings)
    try:
        async with asyncio.timeout(30):
            while True:
                if (
                    name in (await read_workers(client, Keys(settings.redis_prefix))).snapshots
                ) == live:
                    return
                # No event announces another process's snapshot, nor its expiry.
                await asyncio.sleep(0.05)
    finally:
        await client.aclose()


async def test_a_worker_cut_off_past_its_live_entry_reads_the_registry_before_its_next_job(
    settings: Settings, alpha: str
) -> None:
    # Given a worker process serving alpha (no budget) that reaches Redis and PostgreSQL
    # through proxies, and serves under the registry
    async with (
        MockProvider() as mock,
        TcpProxy(settings.redis_url) as redis_proxy,
        TcpProxy(settings.database_url) as pg_proxy,
    ):
        env = worker_env(
            settings,
            mock,
            QUEUEGATE_REDIS_URL=redis_proxy.url,
            QUEUEGATE_DATABASE_URL=pg_proxy.url,
        )
        process = await start_worker(env, [alpha])
        try:
            (name,) = await _serving(settings, [f"{socket.gethostname()}:{process.pid}"])
            async with GatewayClient(settings, team=alpha) as client:
                # When Redis freezes for it until its live entry lapsed, PostgreSQL refuses it,
                # and alpha's budget is cut to nothing meanwhile: the command finds no worker
                # to wait for
                redis_proxy.hang()
                await pg_proxy.down()
                await _shown(settings, name, live=False)
                configured = await configure(settings, alpha, {"budget_usd": Decimal(0)})
                confirmed = await in_force(settings, configured.change, 1)
                assert (confirmed.workers, confirmed.pending) == ([], [])

                # and jobs published after it reach the worker once Redis is back to it,
                # PostgreSQL still refusing it (its teams' security settings served as last
                # read)
                handles = [await client.submit(client.job("gpt-4o-mini", HELLO)) for _ in range(2)]
                await redis_proxy.up()
                await _shown(settings, name, live=True)
                answers = [asyncio.ensure_future(h.result(timeout=60)) for h in handles]
                # Expect none answered while it cannot read the registry again (the old
                # worker served them under its old view within moments), then, once it can,
                done, _ = await asyncio.wait(answers, timeout=CUT_OFF_WAIT)
                assert not done, [answer.result() for answer in done]
                await pg_proxy.up()
                results = await asyncio.gather(*answers)
        finally:
            await redis_proxy.up()
            await pg_proxy.up()
            await stop_workers([process])

    # under the budget it read again, the provider not called
    assert [r.error.code if r.error else r.status for r in results] == ["budget_exhausted"] * 2
    assert mock.stats.calls == 0
