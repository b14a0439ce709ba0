"""A cluster in QUEUEGATE_AMQP_URL: its nodes read, its password hidden, its nodes tried in turn."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from admin.teams import with_user
from queuegate import broker
from queuegate.broker import CLUSTER_HEARTBEAT, NACK_RETRY, connect, nack_window, node_urls
from queuegate.errors import ServiceUnavailable
from queuegate.settings import Settings
from queuegate.urls import redact_url
from tests.faults import RECONNECT_INTERVAL
from tests.proxy import TcpProxy

CLUSTER = "amqp://gw:s3cret@node-1:5672,node-2:5673,[::1]:5674/prod?heartbeat=5"


def test_a_cluster_url_gives_one_url_per_node_with_its_credentials_vhost_and_options() -> None:
    assert node_urls(CLUSTER) == [
        "amqp://gw:s3cret@node-1:5672/prod?heartbeat=5",
        "amqp://gw:s3cret@node-2:5673/prod?heartbeat=5",
        "amqp://gw:s3cret@[::1]:5674/prod?heartbeat=5",
    ]
    assert node_urls("amqp://guest:guest@127.0.0.1:5672/") == ["amqp://guest:guest@127.0.0.1:5672/"]


@pytest.mark.parametrize(
    "url", ["amqp://gw:pw@node-1:5672,,node-2/", "amqp://gw:pw@node-1:5672,node-2:x/"]
)
def test_a_cluster_url_with_a_bad_node_is_refused_naming_it_without_the_password(
    url: str,
) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(amqp_url=url)
    assert "is not host or host:port" in str(refused.value)
    assert "pw" not in str(refused.value)


def test_a_cluster_urls_password_is_redacted_and_its_nodes_kept() -> None:
    assert (
        redact_url(CLUSTER) == "amqp://gw:***@node-1:5672,node-2:5673,[::1]:5674/prod?heartbeat=5"
    )


def test_the_management_api_of_a_cluster_is_its_first_nodes_as_the_same_user() -> None:
    settings = Settings(amqp_url=CLUSTER)
    assert settings.management_url == "http://gw:s3cret@node-1:15672/"
    assert settings.amqp_user == "gw"


def test_refused_publishes_are_sent_again_on_a_cluster_only() -> None:
    # On one node a refusal means a full queue: the producer hears QueueFull at once
    assert nack_window(CLUSTER) == NACK_RETRY > 0
    assert nack_window("amqp://guest:guest@127.0.0.1:5672/") == 0


def test_a_urls_nack_window_is_read_once_not_at_every_publish(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given the nodes of a URL counted as they are read
    url, reads = "amqp://gw:s3cret@node-1:5672,node-2:5673/once", []
    monkeypatch.setattr(broker, "node_urls", lambda url: reads.append(url) or [url, url])
    # When publishers ask its window, as each publish does
    windows = {nack_window(url) for _ in range(3)}
    # Expect the URL read once, and its window the cluster's
    assert windows == {NACK_RETRY} and reads == [url]


def test_a_teams_url_on_a_cluster_keeps_every_node() -> None:
    assert with_user(CLUSTER, "alpha", "p@ss") == (
        "amqp://alpha:p%40ss@node-1:5672,node-2:5673,[::1]:5674/prod?heartbeat=5"
    )


async def test_connect_reaches_the_live_node_whichever_it_tries_first(settings: Settings) -> None:
    # Given a cluster URL whose first node refuses connections (nothing listens there)
    async with TcpProxy(settings.amqp_url) as dead:
        await dead.down()
        live = settings.amqp_url.split("@", 1)[1]
        url = f"amqp://guest:guest@127.0.0.1:{dead.port},{live}"
        # Expect every connection, wherever it starts, to end on the live node
        for _ in range(4):
            connection = await connect(url, name="test-cluster-urls")
            async with connection:
                assert connection.url.port == int(live.split(":")[1].split("/")[0])


async def test_connect_to_a_cluster_of_dead_nodes_says_so_in_one_line(settings: Settings) -> None:
    async with TcpProxy(settings.amqp_url) as one, TcpProxy(settings.amqp_url) as two:
        await one.down()
        await two.down()
        url = f"amqp://guest:pw@127.0.0.1:{one.port},127.0.0.1:{two.port}/"
        with pytest.raises(ServiceUnavailable) as refused:
            await connect(url, name="test-cluster-urls")
    assert str(refused.value).startswith(
        f"RabbitMQ is not reachable at amqp://guest:***@127.0.0.1:{one.port},127.0.0.1:{two.port}/"
    )


@pytest.mark.parametrize("fault", ["dies", "freezes"])
async def test_a_connection_whose_node_is_lost_reconnects_to_another_and_restores_its_channel(
    settings: Settings, fault: str
) -> None:
    # Given a connection through one of two "nodes" (proxies of the same broker), with the
    # cluster's default heartbeat
    async with TcpProxy(settings.amqp_url) as one, TcpProxy(settings.amqp_url) as two:
        url = (
            f"amqp://guest:guest@127.0.0.1:{one.port},127.0.0.1:{two.port}/"
            f"?reconnect_interval={RECONNECT_INTERVAL}"
        )
        connection = await connect(url, name="test-cluster-urls")
        async with connection:
            channel = await connection.channel()
            proxies = {one.port: one, two.port: two}
            first = connection.url.port
            assert first is not None
            assert connection.url.query["heartbeat"] == str(CLUSTER_HEARTBEAT)

            # When its node goes down for good, or freezes: connections stay open, nothing
            # answers (SIGSTOP), so only the missed heartbeats tell
            reconnected = asyncio.Event()
            connection.reconnect_callbacks.add(lambda *_: reconnected.set())
            if fault == "dies":
                await proxies[first].down()
            else:
                proxies[first].hang()

            # Expect it back on the other node, its channel usable: at once when the node
            # dies, after about three heartbeats when it freezes (RabbitMQ's default of 60 s
            # held it for over 100 s)
            async with asyncio.timeout(10 if fault == "dies" else 6 * CLUSTER_HEARTBEAT):
                await reconnected.wait()
                await channel.ready()
            assert connection.url.port != first
            queue = await channel.declare_queue(exclusive=True)
            assert queue.name
