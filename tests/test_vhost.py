"""A gateway on a vhost other than ``/``: the one its AMQP URL names, where the management API
must put what it sets up too (a team's permissions, its queue's quota policy) and look at
what it lists (dead-letter queues, reply queues)."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import aiormq
import httpx
import orjson
import pytest

from admin.teams import configure, quota_policy, rotate
from producer import GatewayClient
from queuegate import dlq
from queuegate.broker import node_urls
from queuegate.management import BrokerAdmin, ManagementApi, vhost_path
from queuegate.settings import Settings
from queuegate.topology import Topology
from tests.support import dead_letters, logged, running_gateway
from tests.teams import quota_in_force

HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.mark.parametrize(
    "url",
    [
        "amqp://gw:pw@rabbit:5672",
        "amqp://gw:pw@rabbit:5672/",
        "amqp://gw:pw@rabbit:5672/%2F",
        "amqp://gw:pw@rabbit:5672/gateway?heartbeat=5",
        "amqp://gw:pw@rabbit:5672/team%2Fgw",
        "amqp://gw:pw@rabbit/with%20space",
        "amqp://gw:pw@node-1:5672,node-2:5672/gateway",
    ],
)
async def test_the_vhost_is_the_one_the_gateways_connections_open(url: str) -> None:
    # Expect the vhost the settings give the management API to be the one aiormq opens
    # (of a cluster, every node's)
    for node in node_urls(url):
        assert Settings(amqp_url=url).vhost == aiormq.Connection(node).vhost


@pytest.fixture
async def on_vhost(settings: Settings) -> AsyncIterator[Settings]:
    """``settings`` on a vhost of the test's own, the gateway's user allowed in it, deleted
    after with all it holds. Its name has a ``/`` (``%2F`` in a URL), as a vhost may."""
    vhost = f"{settings.namespace}/gw"
    parts = urlsplit(settings.amqp_url)
    ours = settings.model_copy(
        update={"amqp_url": urlunsplit(parts._replace(path="/" + quote(vhost, safe="")))}
    )
    assert ours.vhost == vhost
    api = ManagementApi.of(settings.management_url)
    assert api.user is not None and api.password is not None and settings.amqp_user is not None
    async with httpx.AsyncClient(base_url=api.root, auth=(api.user, api.password)) as http:
        (await http.put(f"vhosts/{vhost_path(vhost)}")).raise_for_status()
        try:
            everything = {"configure": ".*", "write": ".*", "read": ".*"}
            user = quote(settings.amqp_user, safe="")
            granted = await http.put(f"permissions/{vhost_path(vhost)}/{user}", json=everything)
            granted.raise_for_status()
            yield ours
        finally:
            # The vhost's queues, policies and permissions go with it; the broker users,
            # schema and Redis keys with the test's namespace (the ``settings`` fixture).
            (await http.delete(f"vhosts/{vhost_path(vhost)}")).raise_for_status()


async def _cli(settings: Settings, *args: str) -> str:
    """A ``queuegate`` command as an operator runs it, configured by its environment alone."""
    env = {
        **os.environ,
        "QUEUEGATE_AMQP_URL": settings.amqp_url,
        "QUEUEGATE_NAMESPACE": settings.namespace,
        "QUEUEGATE_DATABASE_SCHEMA": settings.database_schema,
        "COLUMNS": "400",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", *args, env=env, stdout=asyncio.subprocess.PIPE
    )
    stdout, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, stdout.decode()
    return stdout.decode()


async def _effective_policy(settings: Settings, queue: str, max_length: int) -> dict[str, Any]:
    """The queue's policy and the definition the broker applies, in the settings' vhost, once
    its statistics say ``max-length`` is ``max_length``: a policy put or changed shows there
    only with the queue's next statistics (every 5 s)."""
    async with BrokerAdmin.of(settings) as admin, asyncio.timeout(15):
        while True:
            found = await admin.queue(queue)
            assert found is not None, f"{queue} is not in vhost {settings.vhost}"
            applied = {
                "policy": found.get("policy"),
                **(found.get("effective_policy_definition") or {}),
            }
            if applied.get("max-length") == max_length:
                return applied
            await asyncio.sleep(0.1)


async def test_a_team_added_on_the_gateways_vhost_is_served_as_its_own_user_within_its_quota(
    on_vhost: Settings,
) -> None:
    # Given a gateway whose AMQP URL names a vhost of its own, and team alpha added there
    # the default way by the operator's command
    added = await _cli(on_vhost, "teams", "add", "alpha")
    [url] = re.findall(r"^for its apps: QUEUEGATE_AMQP_URL=(\S+)$", added, flags=re.MULTILINE)
    alpha = on_vhost.model_copy(update={"amqp_url": url})

    # Expect its queue bounded by its quota policy, in that vhost
    queue = Topology.of(on_vhost).team_queue("alpha")
    assert await _effective_policy(on_vhost, queue, on_vhost.max_queue_length) == {
        "policy": quota_policy(on_vhost, "alpha"),
        "max-length": on_vhost.max_queue_length,
        "max-length-bytes": on_vhost.max_queue_bytes,
        "overflow": "reject-publish",
        "dead-letter-routing-key": "alpha",
    }
    # ... and alpha, connecting with the credentials it was given, served by a worker
    async with running_gateway(on_vhost, teams=("alpha",)):
        async with GatewayClient(alpha, team="alpha") as client:
            result = await client.chat("gpt-4o-mini", HELLO, timeout=30)
        assert result.status == "ok", result.error

        # When its credentials are rotated, expect the new ones to reach the vhost and be served
        rotated = await rotate(on_vhost, "alpha")
        assert rotated.amqp_url is not None and rotated.amqp_url != url
        renewed = on_vhost.model_copy(update={"amqp_url": rotated.amqp_url})
        async with GatewayClient(renewed, team="alpha") as client:
            result = await client.chat("gpt-4o-mini", HELLO, timeout=30)
        assert result.status == "ok", result.error

    # When the operator lowers its queue's bound, expect the broker to hold it to the new one
    await configure(on_vhost, "alpha", {"max_queue_length": 3})
    await quota_in_force(on_vhost, "alpha")
    assert (await _effective_policy(on_vhost, queue, 3))["policy"] == quota_policy(
        on_vhost, "alpha"
    )


async def test_dead_letters_on_the_gateways_vhost_are_listed_and_purged(
    on_vhost: Settings,
) -> None:
    # Given a job of alpha's the worker dead-letters (a model the catalog lacks)
    async with running_gateway(on_vhost) as gw, gw.client("alpha") as client:
        body = {"job_id": "bad-1", "team": "alpha", "model": "no-such-model", "messages": HELLO}
        await gw.publish(orjson.dumps(body), message_id="bad-1", reply_to=client.reply_to)
        await client.wait("bad-1", timeout=10)

    # Expect the operator's dlq commands to find it in the gateway's vhost
    [letter] = await dead_letters(on_vhost, 1)
    assert letter.message_id == "bad-1" and letter.team == "alpha"
    assert "bad-1" in await _cli(on_vhost, "dlq", "list")
    assert await dlq.purge(on_vhost) == 1


async def test_workers_see_a_full_reply_queue_on_the_gateways_vhost(on_vhost: Settings) -> None:
    # Given reply queues bounded to 2 results, and alpha's named results queue in the vhost
    settings = on_vhost.model_copy(update={"reply_queue_max_length": 2})
    async with running_gateway(settings, teams=("alpha",)):
        async with GatewayClient(settings, team="alpha", reply_queue="hoard") as client:
            queue = client.reply_to
        with logged("workers.held_results", f"reply queue {queue} holds its bound") as full:
            # When it holds its bound of messages, unread
            connection = await aio_pika.connect(settings.amqp_url)
            async with connection:
                channel = await connection.channel()
                for n in range(2):
                    message = aio_pika.Message(b"{}", message_id=f"held-{n}")
                    await channel.default_exchange.publish(message, routing_key=queue)
            # Expect the workers' look at the vhost's queues to see it, once the broker's
            # statistics (every 5 s) say so
            await asyncio.wait_for(full.wait(), 30)
