"""A refusal reaches only the publisher of the message refused: a bad message sent under a job
id another client awaits is that client's stray, never its answer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import aio_pika
import pytest
import redis.asyncio as aioredis
from aio_pika.abc import AbstractExchange

from admin.teams import Credentials, revoke_key
from mockprovider import Behavior, MockConfig
from producer import GatewayClient
from producer.client import job_message
from producer.streams import ChatStream
from queuegate.broker import Outgoing
from queuegate.keys import Keys
from queuegate.messages import StreamChunk
from queuegate.settings import Settings
from queuegate.signing import KEY_ID_HEADER
from queuegate.topology import Topology
from tests.support import running_gateway, wait_until
from tests.test_api_key_proof import KeyTeam, key_team  # noqa: F401 (a fixture)

HELLO = [{"role": "user", "content": "Hello there"}]
HELD = MockConfig(default=Behavior(latency_ms=1500))
"""A call long enough for a bad message under its job id to be refused while it is held."""
Change = Callable[[dict[str, Any]], dict[str, Any]]
"""What a bad message makes of the fields of the client's own (``_fields``)."""
UNREADABLE: dict[str, Change] = {
    "text/plain": lambda m: m | {"body": b'{"anything": 1}', "content_type": "text/plain"},
    "not JSON": lambda m: m | {"body": b"{garbage"},
    # The client's own body, sent with neither its user_id nor its key's proof: refused
    # unproven, its refusal names a message that is not the client's.
    "unproven copy": lambda m: m | {"user_id": None, "headers": None},
    # The client's whole message, its user_id and key proof included, changed in one of the
    # properties a worker refuses a job for.
    "copy as text/plain": lambda m: m | {"content_type": "text/plain"},
    "copy under another message id": lambda m: m | {"message_id": "another"},
}
ANOTHER_KEY: dict[str, Change] = {
    # (read only of an API key team's jobs)
    "copy with another key id": lambda m: m | {"headers": m["headers"] | {KEY_ID_HEADER: "0" * 12}},
}


@pytest.mark.parametrize("published", [False, True], ids=["submitted", "published"])
async def test_a_bad_message_under_an_awaited_job_id_is_a_stray(
    settings: Settings,
    redis_client: aioredis.Redis,
    teams: dict[str, Credentials],
    published: bool,
) -> None:
    # (team alpha added the default way: its apps publish as its own broker user; a job
    # published to the client's own queue and awaited by id is the client's message too:
    # before, the refusal of a bad copy was that wait's answer)
    assert teams["alpha"].amqp_url is not None
    apps = settings.model_copy(update={"amqp_url": teams["alpha"].amqp_url})
    await _stray(settings, redis_client, apps, UNREADABLE, published=published)


async def test_a_bad_message_under_an_awaited_job_id_is_a_stray_for_an_api_key_team(
    settings: Settings,
    redis_client: aioredis.Redis,
    key_team: KeyTeam,  # noqa: F811 (the fixture)
) -> None:
    # (its apps publish as a broker user they share, which needs no key)
    await _stray(settings, redis_client, key_team.apps, UNREADABLE | ANOTHER_KEY, key_team.key)


async def _stray(
    settings: Settings,
    redis: aioredis.Redis,
    apps: Settings,
    bad: dict[str, Change],
    key: str | None = None,
    *,
    published: bool = False,
) -> None:
    async with (
        running_gateway(settings, mock_config=HELD) as gw,
        GatewayClient(apps, team="alpha", api_key=key) as client,
        _entry(settings, apps) as entry,
    ):
        for n, (how, change) in enumerate(bad.items()):
            # Given a client awaiting a job held in its provider call
            job = client.job("gpt-4o-mini", HELLO, job_id=f"held-{n}")
            if published:
                await client.publish(job, reply_to=client.reply_to)
            else:
                handle = await client.submit(job)
            await _claimed(redis, settings, job.job_id)

            # When someone publishing as the team sends a message under its id that no
            # worker can read, its result to that client's queue
            # (or a copy of the client's own message, unproven or changed)
            own = job_message(job, reply_to=client.reply_to, user_id=apps.amqp_user, api_key=key)
            await entry.publish(aio_pika.Message(**change(_fields(own))), "alpha")

            # Expect the refusal dropped as a stray, and the job answered with its own
            await wait_until(lambda n=n: client.strays == n + 1)
            result = await (client.wait(job.job_id, 10) if published else handle.result(10))
            assert result.status == "ok", (how, result.error)
            assert result.content is not None
        assert gw.mock.stats.calls == len(bad)


def _fields(message: Outgoing) -> dict[str, Any]:
    """``message`` as aio-pika's Message takes it: byte for byte, all a worker reads of it."""
    p = message.properties
    return {
        "body": message.body,
        "content_type": p.content_type,
        "headers": p.headers,
        "message_id": p.message_id,
        "correlation_id": p.correlation_id,
        "reply_to": p.reply_to,
        "user_id": p.user_id,
        "type": p.message_type,
        "timestamp": p.timestamp,
        "delivery_mode": p.delivery_mode,
    }


async def _claimed(redis: aioredis.Redis, settings: Settings, job_id: str) -> None:
    """Once a worker holds the job's claim: it is in its provider call, or about to be."""
    key = Keys(settings.redis_prefix).claim("alpha", job_id)
    async with asyncio.timeout(10):
        while True:
            if await redis.exists(key):
                return
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def _entry(settings: Settings, apps: Settings) -> AsyncIterator[AbstractExchange]:
    """Team alpha's entry exchange, as its apps publish to it (confirmed)."""
    connection = await aio_pika.connect(apps.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        yield await channel.get_exchange(Topology(settings.namespace).entry_exchange("alpha"))


def _unread(apps: Settings, job_id: str, reply_to: str) -> aio_pika.Message:
    """A message under ``job_id`` that no worker reads as a job."""
    return aio_pika.Message(
        b"{garbage",
        content_type="application/json",
        message_id=job_id,
        correlation_id=job_id,
        reply_to=reply_to,
        user_id=apps.amqp_user,
    )


async def test_a_bad_message_under_a_streamed_job_id_ends_no_stream(
    settings: Settings, redis_client: aioredis.Redis, teams: dict[str, Credentials]
) -> None:
    assert teams["alpha"].amqp_url is not None
    apps = settings.model_copy(update={"amqp_url": teams["alpha"].amqp_url})
    async with (
        running_gateway(settings, mock_config=HELD) as gw,
        GatewayClient(apps, team="alpha") as client,
        _entry(settings, apps) as entry,
    ):
        # Given a client reading a streamed job held in its provider call
        stream = client.stream("gpt-4o-mini", HELLO, job_id="streamed")
        reading = asyncio.create_task(_chunks(stream))
        await _claimed(redis_client, settings, "streamed")

        # When a message no worker can read is sent under its id, to that client's queue
        await entry.publish(_unread(apps, "streamed", client.reply_to), "alpha")

        # Expect the refusal dropped, and the stream ended by the job's own answer
        await wait_until(lambda: client.strays == 1)
        chunks = await reading
        assert chunks and stream.result is not None and stream.result.status == "ok"
        assert gw.mock.stats.calls == 1


async def _chunks(stream: ChatStream) -> list[StreamChunk]:
    return [chunk async for chunk in stream]


async def test_a_clients_own_job_refused_unread_reaches_it(
    settings: Settings, teams: dict[str, Credentials]
) -> None:
    assert teams["alpha"].amqp_url is not None
    apps = settings.model_copy(update={"amqp_url": teams["alpha"].amqp_url})
    async with running_gateway(settings) as gw, GatewayClient(apps, team="alpha") as client:
        # When a client's job is refused before the worker reads it as a job (too many messages)
        many = HELLO * (settings.max_job_messages + 1)
        result = await client.chat("gpt-4o-mini", many, timeout=10)

        # Expect the refusal its answer, not a stray
        assert result.error is not None and result.error.code == "invalid_request"
        assert "messages; the limit is" in result.error.message
        assert client.strays == 0
        assert gw.mock.stats.calls == 0


async def test_a_clients_own_job_refused_as_unproven_reaches_it(
    settings: Settings,
    key_team: KeyTeam,  # noqa: F811 (the fixture)
) -> None:
    # (keys looked up again at each job: the revocation below is seen at once)
    settings = settings.model_copy(update={"security_cache_ttl": 0.001})
    async with (
        running_gateway(settings) as gw,
        GatewayClient(key_team.apps, team="alpha", api_key=key_team.key) as client,
    ):
        # Given an API key team's client whose key is revoked once its reply queue is open
        assert await revoke_key(settings, "alpha", key_team.key_id)

        # When it sends a job
        result = await client.chat("gpt-4o-mini", HELLO, timeout=10)

        # Expect the refusal its answer, not a stray
        assert result.error is not None and result.error.code == "unauthorized"
        assert client.strays == 0
        assert gw.mock.stats.calls == 0
