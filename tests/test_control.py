"""The control plane on the real broker: teams declare nothing, the gateway declares for them.

Each attack is made as a hostile team would, with the team's own broker credentials.
"""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
import pytest
from aiormq.exceptions import ChannelAccessRefused

from producer import GatewayClient
from queuegate.control import DIRECT_REPLY_TO, ControlRequest, ControlResponse, OpenReplyQueue
from queuegate.errors import ControlRefused
from queuegate.management import BrokerAdmin
from queuegate.settings import Settings
from queuegate.teams_admin import Credentials, set_security
from tests.support import running_gateway

HELLO = [{"role": "user", "content": "Hello there"}]


def as_team(settings: Settings, credentials: Credentials) -> Settings:
    assert credentials.amqp_url is not None
    return settings.model_copy(update={"amqp_url": credentials.amqp_url})


async def beta_depth(settings: Settings) -> int:
    async with BrokerAdmin(settings.management_url) as admin:
        queue = await admin.queue(f"{settings.namespace}.jobs.beta")
    assert queue is not None
    return int(queue.get("messages", 0))


async def test_a_team_cannot_declare_a_reply_queue_that_dead_letters_into_another_team(
    settings: Settings, teams: dict[str, Credentials]
) -> None:
    # Given alpha's own broker user
    ns = settings.namespace
    assert teams["alpha"].amqp_url is not None
    connection = await aio_pika.connect(teams["alpha"].amqp_url)
    async with connection:
        channel = await connection.channel()
        # When it declares a "reply queue" whose messages die into beta's job queue
        arguments = {
            "x-dead-letter-exchange": f"{ns}.jobs",
            "x-dead-letter-routing-key": "beta",
            "x-message-ttl": 0,
        }
        # Expect the broker to refuse: teams configure nothing
        with pytest.raises(ChannelAccessRefused, match="ACCESS_REFUSED"):
            await channel.declare_queue(f"{ns}.replies.alpha.evil", arguments=arguments)
    assert await beta_depth(settings) == 0


async def test_a_team_cannot_declare_or_bind_exchanges(
    settings: Settings, teams: dict[str, Credentials]
) -> None:
    ns = settings.namespace
    assert teams["alpha"].amqp_url is not None
    connection = await aio_pika.connect(teams["alpha"].amqp_url)
    async with connection:
        # When alpha declares an exchange whose alternate exchange is the jobs exchange
        channel = await connection.channel()
        with pytest.raises(ChannelAccessRefused, match="ACCESS_REFUSED"):
            await channel.declare_exchange(
                f"{ns}.replies.alpha.x",
                aio_pika.ExchangeType.FANOUT,
                arguments={"alternate-exchange": f"{ns}.jobs"},
            )
        # ... or binds the jobs exchange to another exchange (dead letters, usage)
        channel = await connection.channel()
        jobs = await channel.get_exchange(f"{ns}.jobs", ensure=False)
        with pytest.raises(ChannelAccessRefused):
            await jobs.bind(f"{ns}.dead", routing_key="beta")
    # Expect both refused, and nothing in beta's queue
    assert await beta_depth(settings) == 0


async def test_a_team_cannot_send_a_control_request_for_another_team(
    settings: Settings, teams: dict[str, Credentials]
) -> None:
    async with running_gateway(settings, teams=("alpha", "beta")):
        # When alpha's user asks the gateway on beta's behalf
        client = GatewayClient(as_team(settings, teams["alpha"]), team="beta")
        # Expect the broker to refuse the routing key, in one line that says what to check
        with pytest.raises(ControlRefused, match="credentials are not 'beta'"):
            async with client:
                pass


async def test_a_control_request_is_not_a_job_of_the_team(
    settings: Settings, teams: dict[str, Credentials]
) -> None:
    # Given alpha's queue is bound under "alpha"; when alpha sends a request on "alpha.control"
    async with (
        running_gateway(settings, teams=("alpha",)) as gw,
        GatewayClient(as_team(settings, teams["alpha"]), team="alpha") as client,
    ):
        # Expect it answered by the control plane (the reply queue exists, by its name) ...
        assert client.reply_to.startswith(f"{settings.namespace}.replies.alpha.")
        # ... and nothing taken as a job: the worker never saw one, no usage row
        async with BrokerAdmin(settings.management_url) as admin:
            queue = await admin.queue(client.reply_to)
            jobs = await admin.queue(gw.topology.team_queue("alpha"))
        assert queue is not None and jobs is not None
        assert queue["arguments"]["x-expires"] == int(settings.reply_queue_expires * 1000)
        assert queue["arguments"]["x-max-length"] == settings.reply_queue_max_length
        assert jobs.get("messages", 0) == 0 and jobs.get("messages_unacknowledged", 0) == 0
        assert await gw.pool.fetchval("SELECT count(*) FROM usage_log") == 0


async def test_a_team_consumes_direct_replies_with_its_own_user_and_no_queue_permission(
    settings: Settings, teams: dict[str, Credentials]
) -> None:
    # Given alpha's user, with read on its reply queues only, and a running gateway
    async with running_gateway(settings, teams=("alpha",)):
        assert teams["alpha"].amqp_url is not None
        connection = await aio_pika.connect(teams["alpha"].amqp_url)
        async with connection:
            channel = await connection.channel()
            answers: list[ControlResponse] = []
            # When it consumes amq.rabbitmq.reply-to and asks for a reply queue
            reply_to = await channel.get_queue(DIRECT_REPLY_TO, ensure=False)
            done = asyncio.Event()

            async def on_answer(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                answers.append(ControlResponse.model_validate_json(message.body))
                done.set()

            await reply_to.consume(on_answer, no_ack=True)
            exchange = await channel.get_exchange(f"{settings.namespace}.jobs", ensure=False)
            body = ControlRequest(request=OpenReplyQueue(name="direct")).model_dump_json()
            request = aio_pika.Message(
                body.encode(),
                reply_to=DIRECT_REPLY_TO,
                user_id=teams["alpha"].user,
                correlation_id=uuid.uuid4().hex,
            )
            await exchange.publish(request, routing_key="alpha.control")
            await asyncio.wait_for(done.wait(), 10)
    # Expect the answer to arrive: direct reply-to needs no queue permission
    [answer] = answers
    assert answer.ok and answer.result == f"{settings.namespace}.replies.alpha.direct"


async def test_reply_queues_beyond_the_teams_limit_are_refused_until_one_is_closed(
    settings: Settings, teams: dict[str, Credentials]
) -> None:
    # Given a limit of two reply queues per team
    settings = settings.model_copy(update={"reply_queues_per_team": 2})
    alpha = as_team(settings, teams["alpha"])
    async with (
        running_gateway(settings, teams=("alpha",)),
        GatewayClient(alpha, team="alpha"),
        GatewayClient(alpha, team="alpha", reply_queue="nightly"),
    ):
        # When a third client asks for one, expect a refusal that says what to do
        with pytest.raises(ControlRefused, match="2 reply queues, its limit"):
            async with GatewayClient(alpha, team="alpha"):
                pass
        # ... and, once a transient client has closed (its queue deleted), room again
    async with running_gateway(settings, teams=("alpha",)), GatewayClient(alpha, team="alpha"):
        pass


async def test_a_wrong_api_key_opens_no_reply_queue(
    settings: Settings, teams: dict[str, Credentials]
) -> None:
    # Given alpha proves itself with an API key
    _, credentials = await set_security(settings, "alpha", identity="api_key")
    assert credentials is not None and credentials.api_key is not None
    # (workers that trust no operator user: the admin user the client connects as is an app)
    strict = settings.model_copy(update={"operator_users": f"{settings.namespace}.nobody"})
    async with running_gateway(strict, teams=("alpha",)) as gw:
        # When a client brings another key, expect the gateway to refuse its control request
        with pytest.raises(ControlRefused, match="unknown or revoked"):
            async with gw.client("alpha", api_key="qg_000000000000_" + "x" * 43):
                pass
        # ... and the right key to be served
        async with gw.client("alpha", api_key=credentials.api_key) as client:
            result = await client.chat("gpt-4o-mini", HELLO, timeout=10)
            assert result.status == "ok", result.error
