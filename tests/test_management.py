"""The management API client against the real broker: users, permissions, policies."""

from __future__ import annotations

import re
import ssl
import uuid
from typing import Any

import aio_pika
import pytest

from queuegate.errors import ConfigError
from queuegate.management import BrokerAdmin, ManagementError
from queuegate.settings import Settings
from queuegate.topology import Topology
from tests.proxy import TcpProxy


async def test_a_policy_sets_a_queue_quota_the_broker_applies(settings: Settings) -> None:
    topo = Topology(settings.namespace)
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection, BrokerAdmin.of(settings) as admin:
        await topo.declare_team_queue(await connection.channel(), "alpha")
        name = f"{settings.namespace}-quota-alpha"
        pattern = f"^{re.escape(topo.team_queue('alpha'))}$"
        await admin.put_policy(name, pattern=pattern, definition={"max-length": 3})
        try:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(topo.jobs_exchange)
            accepted = 0
            with pytest.raises(aio_pika.exceptions.DeliveryError):
                for _ in range(10):
                    await exchange.publish(aio_pika.Message(b"{}"), routing_key="alpha")
                    accepted += 1
            # A quorum queue checks its length before it enqueues: one message may slip past.
            assert accepted in (3, 4)
        finally:
            await admin.delete_policy(name)
        assert await admin.queue(f"{settings.namespace}.no-such-queue") is None


async def test_a_user_with_no_permissions_cannot_open_the_vhost(settings: Settings) -> None:
    user, password = f"qgt-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    async with BrokerAdmin.of(settings) as admin:
        await admin.put_user(user, password)
        try:
            with pytest.raises(aio_pika.exceptions.AMQPError):
                await aio_pika.connect(f"amqp://{user}:{password}@127.0.0.1:5672/")
            await admin.put_permissions(user, configure="", write="", read="")
            connection = await aio_pika.connect(f"amqp://{user}:{password}@127.0.0.1:5672/")
            await connection.close()
        finally:
            await admin.delete_user(user)


async def test_a_management_url_naming_an_ipv6_address_reaches_the_api(
    settings: Settings,
) -> None:
    # Given the management API at an IPv6 address (the loopback's, passed on to the broker's)
    async with TcpProxy(settings.management_url, listen="::1") as proxy:
        assert "@[::1]:" in proxy.url
        # When an operator's command calls it there
        async with BrokerAdmin(proxy.url, vhost=settings.vhost) as admin:
            # Expect it answered, through that address
            await admin.check_administrator()
        assert proxy.requested > 0


async def test_a_refused_request_is_one_clear_error(settings: Settings) -> None:
    async with BrokerAdmin.of(settings) as admin:
        with pytest.raises(ManagementError, match=r"policies/.*: 400"):
            await admin.put_policy("bad", pattern="(", definition={"max-length": 1})


def test_the_management_url_defaults_to_the_amqp_urls_host_and_user() -> None:
    # Given only an AMQP URL; expect the management API of that broker, as that user
    settings = Settings(amqp_url="amqp://ops:s%40cret@rabbitmq:5672/")
    assert settings.management_url == "http://ops:s%40cret@rabbitmq:15672/"
    tls = Settings(amqp_url="amqps://ops:pw@broker.example:5671/")
    assert tls.management_url == "https://ops:pw@broker.example:15671/"
    # and an explicit one kept as it is
    explicit = Settings(amqp_url="amqp://a:b@h/", management_url="http://admin:pw@m:15672/")
    assert explicit.management_url == "http://admin:pw@m:15672/"


def test_a_management_url_without_a_user_is_refused_not_guessed() -> None:
    with pytest.raises(ConfigError, match="names no user: set QUEUEGATE_MANAGEMENT_URL"):
        BrokerAdmin("http://127.0.0.1:15672/", vhost="/")


def test_a_management_host_httpx_cannot_read_is_refused_without_the_password() -> None:
    # Given a host the settings take (host:port) but httpx cannot read (a zero-width space)
    url = "http://ops:s3cret@bro\u200bker:15672/"
    assert Settings(management_url=url).management_url == url
    # Expect its client refused in one line naming the setting, the password not quoted
    with pytest.raises(ConfigError, match="its client cannot read it") as refused:
        BrokerAdmin(url, vhost="/")
    assert "QUEUEGATE_MANAGEMENT_URL" in str(refused.value)
    assert "s3cret" not in str(refused.value)


async def test_a_wrong_password_names_the_user_and_the_setting(settings: Settings) -> None:
    async with BrokerAdmin("http://guest:wrong@127.0.0.1:15672/", vhost=settings.vhost) as admin:
        with pytest.raises(ManagementError, match="refused user guest: set QUEUEGATE_MANAG"):
            await admin.queue("anything")


async def test_clients_of_the_api_read_the_ca_bundle_once_per_process(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given TLS contexts counted as they are made
    made: list[object] = []
    default_context = ssl.create_default_context

    def counted(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        made.append(args or kwargs)
        return default_context(*args, **kwargs)

    monkeypatch.setattr(ssl, "create_default_context", counted)
    # When three clients of the API are opened, as one `teams add` does, and each asks
    for _ in range(3):
        async with BrokerAdmin.of(settings) as admin:
            assert await admin.users()
    # Expect one context at most (none when this process made it before), not one each
    assert len(made) <= 1
