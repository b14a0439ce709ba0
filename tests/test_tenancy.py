"""Team identities on the real broker: what a team's own user may do, and what workers refuse."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection, AbstractExchange, AbstractIncomingMessage
from aiormq.exceptions import ChannelAccessRefused, ChannelPreconditionFailed

from admin.teams import Credentials, revoke_key, rotate, set_security
from producer import GatewayClient
from queuegate.management import BrokerAdmin
from queuegate.messages import ChatJob
from queuegate.settings import Settings
from queuegate.topology import HEADER_DEAD_REASON, Bound, Topology
from tests.support import running_gateway

HELLO = [{"role": "user", "content": "Hello there"}]


async def ignore(message: AbstractIncomingMessage) -> None:
    """A consumer callback for consumes that must be refused."""


def as_team(settings: Settings, credentials: Credentials) -> Settings:
    assert credentials.amqp_url is not None
    return settings.model_copy(update={"amqp_url": credentials.amqp_url})


async def alpha_connection(teams: dict[str, Credentials]) -> AbstractConnection:
    """A connection under team alpha's own broker user."""
    url = teams["alpha"].amqp_url
    assert url is not None
    return await aio_pika.connect(url)


@asynccontextmanager
async def alpha_entry(
    settings: Settings, teams: dict[str, Credentials]
) -> AsyncIterator[AbstractExchange]:
    """Team alpha's entry exchange, on a channel with confirms under alpha's own user."""
    async with await alpha_connection(teams) as connection:
        channel = await connection.channel(publisher_confirms=True)
        yield await channel.get_exchange(Topology(settings.namespace).entry_exchange("alpha"))


def forged(team: str, *, job_id: str | None = None) -> bytes:
    job = {"job_id": job_id or uuid.uuid4().hex, "team": team, "model": "m", "messages": HELLO}
    return ChatJob.model_validate(job).model_dump_json().encode()


async def test_a_team_cannot_publish_under_another_teams_routing_key(
    settings: Settings, teams: dict[str, Credentials]
) -> None:
    # Given team alpha connected with its own broker user
    async with alpha_entry(settings, teams) as exchange:
        # When it publishes a job under beta's routing key
        # Expect the broker to close the channel: access refused
        with pytest.raises(ChannelAccessRefused, match="topic 'beta'"):
            await exchange.publish(aio_pika.Message(forged("beta")), routing_key="beta")


async def test_a_team_cannot_publish_on_the_default_exchange(
    settings: Settings, teams: dict[str, Credentials]
) -> None:
    # Given team alpha's user, when it publishes straight into beta's queue by name
    connection = await alpha_connection(teams)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        # Expect the broker to refuse: the team has no write on amq.default
        with pytest.raises(ChannelAccessRefused, match=r"amq\.default"):
            await channel.default_exchange.publish(
                aio_pika.Message(forged("beta")), routing_key=f"{settings.namespace}.jobs.beta"
            )


async def test_a_team_cannot_consume_another_teams_job_or_reply_queue(
    settings: Settings, teams: dict[str, Credentials]
) -> None:
    # Given beta's job queue and a durable reply queue of beta's
    ns = settings.namespace
    beta_results = f"{ns}.results.beta.nightly"
    async with (
        running_gateway(settings, teams=("alpha", "beta")),
        GatewayClient(as_team(settings, teams["beta"]), team="beta", reply_queue="nightly"),
    ):
        pass
    connection = await alpha_connection(teams)
    try:
        async with connection:
            for queue_name in (f"{ns}.jobs.beta", beta_results, f"{ns}.jobs.alpha"):
                # When alpha tries to consume it
                channel = await connection.channel()
                queue = await channel.get_queue(queue_name, ensure=False)
                # Expect access refused (its own job queue included: only workers read it)
                with pytest.raises(ChannelAccessRefused, match="access to queue"):
                    await queue.consume(ignore)
    finally:
        admin_connection = await aio_pika.connect(settings.amqp_url)
        async with admin_connection:
            await (await admin_connection.channel()).queue_delete(beta_results)


async def test_a_user_id_other_than_the_connections_user_is_refused_by_the_broker(
    settings: Settings, teams: dict[str, Credentials]
) -> None:
    async with alpha_entry(settings, teams) as exchange:
        # When alpha's connection claims to be beta's user
        message = aio_pika.Message(forged("alpha"), user_id=teams["beta"].user)
        # Expect the broker itself to refuse it
        with pytest.raises(ChannelPreconditionFailed, match="user_id property set to"):
            await exchange.publish(message, routing_key="alpha")


async def test_a_team_with_its_broker_user_is_served_and_its_identity_recorded(
    settings: Settings, teams: dict[str, Credentials]
) -> None:
    # Given alpha uses its broker user
    async with (
        running_gateway(settings, teams=("alpha",)) as gw,
        GatewayClient(as_team(settings, teams["alpha"]), team="alpha") as client,
    ):
        # When it asks for a completion
        result = await client.chat("gpt-4o-mini", HELLO, timeout=10)
        # Expect an answer, and the audit row naming the proven publisher
        assert result.status == "ok", result.error
        [row] = await gw.usage_rows(1)
        assert row["identity"] == f"broker:{teams['alpha'].user}"


async def test_a_job_forged_with_another_team_field_is_unauthorized(
    settings: Settings, teams: dict[str, Credentials], caplog: pytest.LogCaptureFixture
) -> None:
    # Given alpha's client and alpha's user publishing under its own key
    alpha = as_team(settings, teams["alpha"])
    async with (
        running_gateway(settings, teams=("alpha", "beta")) as gw,
        GatewayClient(alpha, team="alpha") as client,
    ):
        connection = await aio_pika.connect(alpha.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(gw.topology.entry_exchange("alpha"))
            # When the job inside says it is beta's
            await exchange.publish(
                aio_pika.Message(
                    forged("beta", job_id="forged"),
                    message_id="forged",
                    correlation_id="forged",
                    reply_to=client.reply_to,
                    user_id=teams["alpha"].user,
                ),
                routing_key="alpha",
            )
        # Expect unauthorized, and the job dead-lettered
        result = await client.wait("forged", timeout=10)
        assert result.error is not None and result.error.code == "unauthorized"
        [dead] = await gw.dead_letters(1)
        assert dead.headers[HEADER_DEAD_REASON] == "unauthorized"
        # ... audited with who sent it and the model it asked for, and logged
        [row] = await gw.usage_rows(1)
        assert row["identity"] == f"claimed:user_id={teams['alpha'].user}"
        assert row["model_requested"] == "m"
    assert any(
        "'forged' for team alpha refused (unauthorized" in record.getMessage()
        for record in caplog.records
    )


def not_operator(settings: Settings) -> Settings:
    """The settings of a gateway whose operator and front door are users nobody connects as:
    the admin user the tests publish with is then just one more app, not trusted for every
    team."""
    nobody = f"{settings.namespace}.operator"
    return settings.model_copy(update={"operator_users": nobody, "frontdoor_users": nobody})


async def test_a_broker_identity_team_refuses_jobs_from_any_other_user(
    settings: Settings, teams: dict[str, Credentials]
) -> None:
    # Given alpha requires its broker user, when another user (not an operator) publishes for it
    # (its reply going to a queue alpha's own client opened: only alpha may ask for one)
    settings = not_operator(settings)
    async with (
        running_gateway(settings, teams=("alpha",)) as gw,
        GatewayClient(as_team(settings, teams["alpha"]), team="alpha") as alpha,
        gw.client("alpha", listen=False) as admin,
    ):
        job = admin.job("gpt-4o-mini", HELLO)
        await admin.publish(job, reply_to=alpha.reply_to)
        result = await alpha.wait(job.job_id, timeout=10)
        # Expect unauthorized and no provider call
        assert result.error is not None and result.error.code == "unauthorized"
        assert "may not publish for team 'alpha'" in result.error.message
        assert gw.mock.stats.calls == 0
        # ... and the audit row saying who it claimed to be
        [row] = await gw.usage_rows(1)
        assert row["identity"] == "claimed:user_id=guest"


async def test_an_operator_may_submit_for_a_broker_identity_team(
    settings: Settings, teams: dict[str, Credentials]
) -> None:
    # Given alpha requires its broker user, when the gateway's own user (an operator, as
    # `queuegate submit` runs by default) publishes a job for it
    async with running_gateway(settings, teams=("alpha",)) as gw, gw.client("alpha") as client:
        result = await client.chat("gpt-4o-mini", HELLO, timeout=10)
        # Expect it served, and audited as the operator's
        assert result.status == "ok", result.error
        [row] = await gw.usage_rows(1)
        assert row["identity"] == f"operator:{settings.amqp_user}"


async def test_a_reply_to_outside_the_teams_reply_queues_is_refused_and_not_answered(
    settings: Settings, teams: dict[str, Credentials]
) -> None:
    # Given a durable reply queue of beta's
    ns = settings.namespace
    victim = f"{ns}.results.beta.inbox"
    async with running_gateway(settings, teams=("alpha", "beta")) as gw:
        admin_connection = await aio_pika.connect(settings.amqp_url)
        async with admin_connection:
            admin_channel = await admin_connection.channel()
            await gw.topology.declare_results_queue(
                admin_channel,
                "beta",
                "inbox",
                expires_s=settings.results_queue_expires,
                bound=Bound.of(settings),
            )
            try:
                # When alpha sends a job whose reply_to is beta's queue
                async with alpha_entry(settings, teams) as exchange:
                    await exchange.publish(
                        aio_pika.Message(
                            forged("alpha", job_id="misdirected"),
                            message_id="misdirected",
                            reply_to=victim,
                            user_id=teams["alpha"].user,
                        ),
                        routing_key="alpha",
                    )
                # Expect it refused and dead-lettered, and nothing delivered into beta's queue
                [dead] = await gw.dead_letters(1)
                assert dead.headers[HEADER_DEAD_REASON] == "unauthorized"
                [row] = await gw.usage_rows(1)
                assert row["error_code"] == "unauthorized" and not row["reply_delivered"]
                queue = await admin_channel.declare_queue(victim, passive=True)
                assert queue.declaration_result.message_count == 0
                assert gw.mock.stats.calls == 0
            finally:
                await admin_channel.queue_delete(victim)


async def test_rotated_credentials_replace_the_old_password(
    settings: Settings, teams: dict[str, Credentials]
) -> None:
    # Given alpha's credentials, when they are rotated
    old = teams["alpha"]
    new = await rotate(settings, "alpha")
    # Expect the same user, a new password that connects, and the old one refused
    assert new.user == old.user and new.password != old.password
    assert new.amqp_url is not None and old.amqp_url is not None
    connection = await aio_pika.connect(new.amqp_url)
    await connection.close()
    with pytest.raises(aio_pika.exceptions.AMQPError):
        await aio_pika.connect(old.amqp_url)


async def test_a_revoked_api_key_is_unauthorized_within_the_cache_lifetime(
    settings: Settings, teams: dict[str, Credentials]
) -> None:
    # Given alpha identified by API key, its apps sharing a broker user that is no operator's,
    # and workers caching keys for half a second
    settings = not_operator(settings).model_copy(update={"security_cache_ttl": 0.5})
    _, credentials = await set_security(settings, "alpha", identity="api_key")
    assert credentials is not None and credentials.api_key is not None
    assert credentials.api_key_id is not None
    async with (
        running_gateway(settings, teams=("alpha",)) as gw,
        gw.client("alpha", api_key=credentials.api_key) as client,
        # (a stranger's key opens no reply queue: its job asks for the real client's)
        gw.client("alpha", api_key="qg_000000000000_" + "x" * 43, listen=False) as stranger,
    ):
        ok = await client.chat("gpt-4o-mini", HELLO, timeout=10)
        assert ok.status == "ok", ok.error
        forged_job = stranger.job("gpt-4o-mini", HELLO)
        await stranger.publish(forged_job, reply_to=client.reply_to)
        refused = await client.wait(forged_job.job_id, timeout=10)
        assert refused.error is not None and refused.error.code == "unauthorized"
        # When the key is revoked
        assert await revoke_key(settings, "alpha", credentials.api_key_id)
        revoked_at = time.monotonic()
        # Expect unauthorized once the cached answer expires, and no later than that
        while (result := await client.chat("gpt-4o-mini", HELLO, timeout=10)).status == "ok":
            assert time.monotonic() - revoked_at < 0.5 + 1.0, "revoked key still accepted"
        assert result.error is not None and result.error.code == "unauthorized"
        assert result.error.message == "the API key is unknown or revoked"
        await gw.usage_rows(3)
        identity = await gw.pool.fetchval(
            "SELECT identity FROM usage_log WHERE job_id = $1", ok.job_id
        )
        assert identity == f"api_key:{credentials.api_key_id}"


async def test_rotating_credentials_closes_connections_opened_with_the_old_ones(
    settings: Settings, teams: dict[str, Credentials]
) -> None:
    # Given an app connected with alpha's current password
    connection = await alpha_connection(teams)
    closed = asyncio.Event()
    connection.close_callbacks.add(lambda *_: closed.set())
    async with BrokerAdmin.of(settings) as admin:
        # (the management API lists a connection once the broker has reported it)
        assert teams["alpha"].user is not None
        for _ in range(200):  # no event announces it: up to 10 s
            if await admin.connections(teams["alpha"].user):
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the broker never listed the connection")
    # When the credentials are rotated
    await rotate(settings, "alpha")
    # Expect the broker to close that connection
    await asyncio.wait_for(closed.wait(), 10)


async def test_teams_add_prints_credentials_that_work_and_stores_no_password(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from cli.main import app
    from queuegate.db import create_pool

    # Given the CLI pointed at this test's namespace and schema
    monkeypatch.setenv("QUEUEGATE_NAMESPACE", settings.namespace)
    monkeypatch.setenv("QUEUEGATE_DATABASE_SCHEMA", settings.database_schema)
    user = f"{settings.namespace}.gamma"
    try:
        # When an operator adds a team
        result = await asyncio.to_thread(CliRunner().invoke, app, ["teams", "add", "gamma"])
        # Expect the broker user and a URL printed, which connects
        assert result.exit_code == 0, result.output
        [url] = [w.split("=", 1)[1] for w in result.output.split() if w.startswith("QUEUEGATE_")]
        password = url.split(":")[2].split("@")[0]
        connection = await aio_pika.connect(url)
        await connection.close()
        # ... and the password nowhere in the registry
        pool = await create_pool(settings)
        try:
            rows = await pool.fetch("SELECT row_to_json(t)::text FROM team_security t")
        finally:
            await pool.close()
        assert [user in row[0] for row in rows] == [True]
        assert all(password not in row[0] for row in rows)
    finally:
        async with BrokerAdmin.of(settings) as admin:
            await admin.delete_user(user)


async def test_a_job_id_another_team_used_gets_its_own_answer_and_is_accounted(
    settings: Settings,
) -> None:
    # Given beta's job answered under id "shared"
    async with (
        running_gateway(settings, teams=("alpha", "beta")) as gw,
        gw.client("alpha") as alpha,
        gw.client("beta") as beta,
    ):
        secret = [{"role": "user", "content": "beta's private question"}]
        first = await (await beta.submit(beta.job("gpt-4o-mini", secret, job_id="shared"))).result(
            10
        )
        # When alpha sends its own job under the same id
        job = alpha.job("gpt-4o-mini", HELLO, job_id="shared")
        second = await (await alpha.submit(job)).result(10)
        # Expect alpha served afresh (never beta's stored answer), and both jobs accounted
        assert first.content and "private" in first.content
        assert second.team == "alpha" and second.content and "private" not in second.content
        assert gw.mock.stats.calls == 2
        rows = await gw.usage_rows(2)
        assert sorted((row["team"], row["job_id"]) for row in rows) == [
            ("alpha", "shared"),
            ("beta", "shared"),
        ]


async def test_a_refused_forgery_does_not_answer_the_real_job_in_advance(
    settings: Settings, teams: dict[str, Credentials]
) -> None:
    # Given alpha requires its broker user, and someone else sends a job under alpha's next id
    settings = not_operator(settings)
    async with (
        running_gateway(settings, teams=("alpha",)) as gw,
        gw.client("alpha", listen=False) as impostor,
        GatewayClient(as_team(settings, teams["alpha"]), team="alpha") as witness,
        GatewayClient(as_team(settings, teams["alpha"]), team="alpha") as client,
    ):
        # (its refusal going to a reply queue only alpha could open)
        forged_job = impostor.job("gpt-4o-mini", HELLO, job_id="next")
        await impostor.publish(forged_job, reply_to=witness.reply_to)
        refused = await witness.wait("next", timeout=10)
        assert refused.error is not None and refused.error.code == "unauthorized"
        # When alpha's real job with that id arrives
        real = await (await client.submit(client.job("gpt-4o-mini", HELLO, job_id="next"))).result(
            10
        )
        # Expect it served, not answered with the stored refusal, and accounted
        assert real.status == "ok", real.error
        rows = await gw.usage_rows(2)
        assert [row["status"] for row in rows if row["job_id"] == "next"] == ["ok"]


async def test_a_team_sees_another_queues_depth_but_never_its_messages(
    settings: Settings, teams: dict[str, Credentials]
) -> None:
    # Given a job waiting in beta's queue (no worker serves beta; one serving gamma answers
    # beta's client's request for a reply queue)
    async with (
        running_gateway(settings, teams=("gamma",)),
        GatewayClient(as_team(settings, teams["beta"]), team="beta") as beta,
    ):
        await beta.submit(beta.job("gpt-4o-mini", HELLO))
    connection = await alpha_connection(teams)
    async with connection:
        # When alpha declares beta's queue passively: the broker checks no permission for it
        channel = await connection.channel()
        queue = await channel.declare_queue(f"{settings.namespace}.jobs.beta", passive=True)
        # Expect the depth (accepted, README "Threat model"), and no way to its message
        assert queue.declaration_result.message_count == 1
        with pytest.raises(ChannelAccessRefused, match="access to queue"):
            await queue.get(no_ack=False)
