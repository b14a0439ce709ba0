"""Each team publishes to an exchange of its own: the keys of a ``CC`` or ``BCC`` header, which
RabbitMQ before 4.0.3 does not check against topic permissions, reach no other team."""

from __future__ import annotations

import asyncio
import re

import aio_pika
import pytest
from aiormq.exceptions import ChannelAccessRefused, ChannelNotFoundEntity

from admin.teams import Credentials, add
from producer import GatewayClient
from producer.client import job_message
from queuegate.broker import publish
from queuegate.management import BrokerAdmin
from queuegate.messages import ChatJob
from queuegate.settings import Settings
from queuegate.tenancy import permissions
from queuegate.topology import Bound, Topology
from tests.support import depth, running_gateway

HELLO = [{"role": "user", "content": "Hello there"}]
BETA_KEYS = ["beta", "beta.control"]


def as_team(settings: Settings, credentials: Credentials) -> Settings:
    assert credentials.amqp_url is not None
    return settings.model_copy(update={"amqp_url": credentials.amqp_url})


async def copy_to_beta(settings: Settings, alpha: Credentials, reply_to: str) -> list[str]:
    """Alpha's own job, naming beta's keys in ``CC`` and ``BCC``, sent with alpha's user to
    each exchange it could write to, the shared one and its own; the ids the broker took
    (refusing, or not knowing, an exchange is the broker's to do)."""
    topology = Topology(settings.namespace)
    taken = []
    connection = await aio_pika.connect(as_team(settings, alpha).amqp_url)
    async with connection:
        for exchange in (topology.jobs_exchange, topology.entry_exchange("alpha")):
            job = ChatJob(job_id=exchange, team="alpha", model="gpt-4o-mini", messages=HELLO)
            message = job_message(job, reply_to=reply_to, user_id=alpha.user)
            assert message.properties.headers is not None
            message.properties.headers.update({"CC": BETA_KEYS, "BCC": BETA_KEYS})
            channel = await connection.channel(publisher_confirms=True)
            try:
                await publish(channel, message, exchange=exchange, routing_key="alpha")
            except (ChannelAccessRefused, ChannelNotFoundEntity):
                continue
            taken.append(job.job_id)
    return taken


async def test_a_teams_cc_and_bcc_headers_reach_no_other_teams_queue_nor_usage_log(
    settings: Settings, teams: dict[str, Credentials]
) -> None:
    alpha = teams["alpha"]
    topology = Topology(settings.namespace)
    # Given alpha's results queue, declared as a worker declares it at alpha's request
    admin = await aio_pika.connect(settings.amqp_url)
    async with admin:
        inbox = await topology.declare_results_queue(
            await admin.channel(),
            "alpha",
            "inbox",
            expires_s=settings.results_queue_expires,
            bound=Bound.of(settings),
        )
    # When alpha, with its own broker user, sends its job with CC and BCC headers naming
    # beta's job and control keys to every exchange it can name
    taken = await copy_to_beta(settings, alpha, inbox.name)
    # Expect none of it in beta's queues (no worker yet: what the broker confirmed is there)
    assert await depth(settings, topology.team_queue("beta")) == 0
    assert await depth(settings, topology.control_queue("beta")) == 0
    # ... and, once workers serve both teams, alpha's jobs answered to alpha, and every row of
    # the usage log alpha's
    async with (
        running_gateway(settings, teams=("alpha", "beta")) as gw,
        GatewayClient(as_team(settings, alpha), team="alpha", reply_queue="inbox") as client,
    ):
        for job_id in taken:
            assert (await client.wait(job_id, timeout=10)).status == "ok"
        assert (await client.chat("gpt-4o-mini", HELLO, timeout=10)).status == "ok"
        rows = await gw.usage_rows(len(taken) + 1)
        assert [row["team"] for row in rows] == ["alpha"] * (len(taken) + 1)


async def test_a_teams_user_may_publish_to_its_own_entry_exchange_alone(
    settings: Settings, teams: dict[str, Credentials]
) -> None:
    topology = Topology(settings.namespace)
    connection = await aio_pika.connect(as_team(settings, teams["alpha"]).amqp_url)
    async with connection:
        # When alpha's user publishes under its own key to the shared jobs exchange, or to
        # beta's entry exchange under beta's key
        for exchange, key in (
            (topology.jobs_exchange, "alpha"),
            (topology.entry_exchange("beta"), "beta"),
        ):
            channel = await connection.channel(publisher_confirms=True)
            target = await channel.get_exchange(exchange)
            # Expect the broker to refuse it, naming the exchange
            with pytest.raises(ChannelAccessRefused, match=f"exchange '{re.escape(exchange)}'"):
                await target.publish(aio_pika.Message(b"{}"), routing_key=key)
        # ... and to take it on alpha's own
        channel = await connection.channel(publisher_confirms=True)
        own = await channel.get_exchange(topology.entry_exchange("alpha"))
        await own.publish(aio_pika.Message(b"{}"), routing_key="alpha")
    assert await depth(settings, topology.team_queue("alpha")) == 1


def test_a_teams_write_permission_matches_its_entry_exchange_alone() -> None:
    topology = Topology("ns")
    write = permissions("ns", "alpha").write
    # The broker finds a match anywhere in a name (Erlang re): the anchors must hold
    assert re.search(write, topology.entry_exchange("alpha"))
    for other in (
        topology.entry_exchange("alpha2"),
        topology.entry_exchange("alph"),
        topology.entry_exchange("beta"),
        f"{topology.entry_exchange('alpha')}.x",
        f"x{topology.entry_exchange('alpha')}",
        Topology("ns2").entry_exchange("alpha"),
        topology.jobs_exchange,
        "",
    ):
        assert not re.search(write, other), other


async def test_adding_an_earlier_versions_team_again_closes_its_apps_publishing_to_jobs(
    settings: Settings, teams: dict[str, Credentials]
) -> None:
    alpha = teams["alpha"]
    assert alpha.user is not None
    topology = Topology(settings.namespace)
    # Given alpha's user with an earlier version's permissions (the jobs exchange, its keys)
    async with BrokerAdmin.of(settings) as admin:
        await admin.put_permissions(
            alpha.user, configure="^$", write=f"^{re.escape(topology.jobs_exchange)}$", read="^$"
        )
        await admin.delete_topic_permissions(alpha.user)
        await admin.put_topic_permissions(
            alpha.user, exchange=topology.jobs_exchange, write=r"^alpha(\.control)?$", read="^$"
        )
    # ... and one of alpha's apps of then, publishing there on an open channel
    app = await aio_pika.connect(as_team(settings, alpha).amqp_url)
    async with app:
        closed = asyncio.Event()
        app.close_callbacks.add(lambda *_: closed.set())
        channel = await app.channel(publisher_confirms=True)
        jobs = await channel.get_exchange(topology.jobs_exchange)
        await jobs.publish(aio_pika.Message(b"{}"), routing_key="alpha")
        async with BrokerAdmin.of(settings) as admin, asyncio.timeout(30):
            # Listed once the broker's statistics have it (every few seconds): no event tells
            while not await admin.connections(alpha.user):  # noqa: ASYNC110
                await asyncio.sleep(0.2)

        # When the operator adds the team again, as the upgrade says
        await add(settings, "alpha")

        # Expect the app's connection closed: the broker keeps the rights a channel has used
        await asyncio.wait_for(closed.wait(), 10)
    # ... and a new one refused on the jobs exchange, taken on alpha's own
    connection = await aio_pika.connect(as_team(settings, alpha).amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        jobs = await channel.get_exchange(topology.jobs_exchange)
        with pytest.raises(ChannelAccessRefused):
            await jobs.publish(aio_pika.Message(b"{}"), routing_key="alpha")
        channel = await connection.channel(publisher_confirms=True)
        own = await channel.get_exchange(topology.entry_exchange("alpha"))
        await own.publish(aio_pika.Message(b"{}"), routing_key="alpha")
