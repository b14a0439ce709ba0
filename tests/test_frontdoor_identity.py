"""Workers and the front door's jobs: a key proof is honoured from a front-door user alone,
and the front door can act for no team whose key it was not given."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import pytest
from aio_pika.abc import AbstractQueue

from admin.teams import Credentials, create_broker_user
from producer.client import job_message
from queuegate.broker import publish
from queuegate.db import create_pool
from queuegate.management import BrokerAdmin
from queuegate.messages import ChatJob, ChatResult
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from queuegate.tenancy import add_api_key
from queuegate.topology import Topology
from tests.support import Gateway, running_gateway

HELLO = [{"role": "user", "content": "Hello there"}]


def nobody_operates(settings: Settings) -> Settings:
    """The gateway's own user (guest) is the front door's, and no operator."""
    return settings.model_copy(update={"operator_users": f"{settings.namespace}.operator"})


@dataclass(frozen=True)
class Keys:
    alpha: str
    beta: str
    beta_id: str


@pytest.fixture
async def keys(settings: Settings, teams: dict[str, Credentials]) -> Keys:
    """An HTTP key for each of alpha and beta (both identified by their broker users)."""
    pool = await create_pool(settings)
    try:
        _, alpha = await add_api_key(pool, "alpha")
        beta_id, beta = await add_api_key(pool, "beta")
    finally:
        await pool.close()
    return Keys(alpha, beta, beta_id)


@pytest.fixture
async def beta_apps(settings: Settings, teams: dict[str, Credentials]) -> AsyncIterator[Settings]:
    """A broker user that may publish for beta, as beta's apps would share: no front door."""
    user, password = f"{settings.namespace}.apps", uuid.uuid4().hex
    await create_broker_user(settings, "beta", user, password, TeamConfig())
    parts = urlsplit(settings.amqp_url)
    netloc = f"{quote(user)}:{password}@{parts.hostname}:{parts.port or 5672}"
    try:
        yield settings.model_copy(update={"amqp_url": urlunsplit(parts._replace(netloc=netloc))})
    finally:
        async with BrokerAdmin.of(settings) as admin:
            await admin.delete_user(user)


async def frontdoor_queue(gw: Gateway, channel: aio_pika.abc.AbstractChannel) -> AbstractQueue:
    topology = Topology(gw.settings.namespace)
    return await topology.declare_frontdoor_queue(
        channel, uuid.uuid4().hex, expires_s=60, max_length=100
    )


def beta_job() -> ChatJob:
    return ChatJob(job_id=uuid.uuid4().hex, team="beta", model="gpt-4o-mini", messages=HELLO)


async def send(publisher: Settings, job: ChatJob, reply_to: str, api_key: str | None) -> None:
    """Publish ``job`` as the user of ``publisher``, signed with ``api_key`` if given, to
    beta's entry exchange (the gateway's user may write there too)."""
    message = job_message(job, reply_to=reply_to, user_id=publisher.amqp_user, api_key=api_key)
    async with await aio_pika.connect(publisher.amqp_url) as connection:
        channel = await connection.channel(publisher_confirms=True)
        await publish(
            channel,
            message,
            exchange=Topology(publisher.namespace).entry_exchange("beta"),
            routing_key="beta",
        )


async def result_in(queue: AbstractQueue) -> ChatResult:
    async with queue.iterator(timeout=10) as messages:
        async for message in messages:
            await message.ack()
            if message.type == "result":
                return ChatResult.model_validate_json(message.body)
    raise AssertionError("no result")


async def test_a_front_door_user_proves_a_job_by_the_teams_key_whatever_its_identity(
    settings: Settings, keys: Keys
) -> None:
    # Given beta identified by its own broker user, and the front door's user no operator
    settings = nobody_operates(settings)
    async with running_gateway(settings, teams=("beta",)) as gw:
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            queue = await frontdoor_queue(gw, await connection.channel())
            # When the front door's user publishes beta's job signed with beta's key
            signed = beta_job()
            await send(settings, signed, queue.name, keys.beta)
            # Expect it served, its answer on the front door's queue, proven by the key
            result = await result_in(queue)
            assert result.job_id == signed.job_id and result.status == "ok", result.error
            # When it publishes one without a proof, and one signed with alpha's key
            unsigned, foreign = beta_job(), beta_job()
            await send(settings, unsigned, queue.name, None)
            assert (await result_in(queue)).error.code == "unauthorized"  # type: ignore[union-attr]
            await send(settings, foreign, queue.name, keys.alpha)
            refused = await result_in(queue)
            assert refused.error is not None and refused.error.code == "unauthorized"
            assert "may not publish for team 'beta'" in refused.error.message
        # (a refused job's row is under "<job id>/refused/<digest of its message>")
        rows = {row["job_id"].split("/")[0]: row for row in await gw.usage_rows(3)}
    assert rows[signed.job_id]["identity"] == f"frontdoor:guest/api_key:{keys.beta_id}"
    assert rows[unsigned.job_id]["error_code"] == rows[foreign.job_id]["error_code"]
    assert rows[foreign.job_id]["error_code"] == "unauthorized"
    assert gw.mock.stats.calls == 1


async def test_another_broker_user_gains_nothing_from_front_door_headers(
    settings: Settings, keys: Keys, beta_apps: Settings
) -> None:
    # Given a broker user allowed to publish for beta, which is not the front door's
    settings = nobody_operates(settings)
    async with running_gateway(settings, teams=("beta",)) as gw:
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            queue = await frontdoor_queue(gw, await connection.channel())
            # When it publishes beta's job signed exactly as the front door signs one, with
            # its result to go to a front-door queue
            forged = beta_job()
            await send(beta_apps, forged, queue.name, keys.beta)
            # Expect it refused as not beta's broker user, no answer sent to that queue
            [row] = await gw.usage_rows(1)
            assert row["job_id"].startswith(f"{forged.job_id}/refused/")
            assert row["error_code"] == "unauthorized"
            claimed = f"claimed:user_id={beta_apps.amqp_user},api_key={keys.beta_id}"
            assert row["identity"] == claimed
            assert (await queue.declare()).message_count == 0
    assert gw.mock.stats.calls == 0
