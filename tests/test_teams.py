"""The team registry and its commands: configs, queue quotas, and workers picking them up."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from decimal import Decimal

import aio_pika
import pytest
from typer.testing import CliRunner

from mockprovider import Behavior, MockConfig
from producer import GatewayClient
from queuegate.cli import app
from queuegate.db import create_pool
from queuegate.errors import QueueFull
from queuegate.management import BrokerAdmin
from queuegate.settings import Settings
from queuegate.teams_admin import add, configure, quota_policy
from queuegate.topology import Topology
from tests.support import running_gateway, wait_until

HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture
async def alpha(settings: Settings) -> AsyncIterator[str]:
    """Team alpha registered; its quota policy removed afterwards."""
    await add(settings, "alpha", identity="queue")  # these tests publish as the guest user
    yield "alpha"
    async with BrokerAdmin(settings.management_url) as admin:
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
    set_args += ["--model", "gpt-4o:tpm=1000,budget=5"]
    assert runner.invoke(app, set_args, env=env).exit_code == 0
    shown = runner.invoke(app, ["teams", "show", "alpha", "--json"], env=env)

    # Expect them back, and the table form to render
    config = json.loads(shown.stdout)
    assert config["rpm"] == 100
    assert Decimal(config["budget_usd"]) == 50
    assert config["models"]["gpt-4o"]["tpm"] == 1000
    table = runner.invoke(app, ["teams", "show", "alpha"], env=env)
    assert table.exit_code == 0 and "gpt-4o" in table.stdout


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
