"""Dead letters as a team would abuse them, and replays as an operator runs them.

Each team here is added the default way (its own broker user) and attacks with its own
credentials; the operator is the gateway's own user, as ``queuegate dlq`` runs by default.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import timedelta
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika

from admin.teams import Credentials, create_broker_user
from producer import GatewayClient
from queuegate import dlq
from queuegate.management import BrokerAdmin
from queuegate.messages import ChatJob
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from queuegate.topology import (
    DEAD_BODY_LIMIT,
    DEAD_MAX_BYTES,
    DEAD_MAX_LENGTH,
    HEADER_DEAD_QUEUE,
    HEADER_DEAD_REASON,
    HEADER_DEAD_TRUNCATED,
    TEAM_DEAD_MAX_BYTES,
    Topology,
)
from tests.support import dead_letters, depth, running_gateway

HELLO = [{"role": "user", "content": "Hello there"}]


async def drained(settings: Settings, queue: str) -> None:
    """Until ``queue`` holds no job ready (the broker announces no expiry)."""
    async with asyncio.timeout(120):
        while await depth(settings, queue):  # noqa: ASYNC110 (polled: no event to await)
            await asyncio.sleep(0.1)


async def publish_as(
    credentials: Credentials, settings: Settings, message: aio_pika.Message, team: str
) -> None:
    assert credentials.amqp_url is not None
    connection = await aio_pika.connect(credentials.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(Topology(settings.namespace).entry_exchange(team))
        await exchange.publish(message, routing_key=team)


async def test_a_teams_forged_dead_letter_headers_never_reach_accounting_or_another_team(
    settings: Settings, teams: dict[str, Credentials]
) -> None:
    topology = Topology(settings.namespace)
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        await topology.declare_usage(await connection.channel())
    alpha = teams["alpha"]
    usage = {"job_id": "forged-usage", "team": "beta", "cost_usd": "777.25", "status": "ok"}
    # When alpha, with its own user, publishes under its own key messages that expire at once,
    # one headed (and with a forged x-death entry) as if dead-lettered from accounting
    await publish_as(
        alpha,
        settings,
        aio_pika.Message(
            json.dumps(usage).encode(),
            message_id="forged-usage",
            user_id=alpha.user,
            expiration=timedelta(milliseconds=1),
            headers={
                HEADER_DEAD_QUEUE: topology.accounting_queue,
                HEADER_DEAD_REASON: "delivery_limit",
                "x-death": [{"queue": topology.accounting_queue, "reason": "rejected", "count": 1}],
            },
        ),
        "alpha",
    )
    # ... and one headed as if dead-lettered from beta's job queue
    job = ChatJob.model_validate(
        {"job_id": "forged-move", "team": "beta", "model": "gpt-4o-mini", "messages": HELLO}
    )
    await publish_as(
        alpha,
        settings,
        aio_pika.Message(
            job.model_dump_json().encode(),
            message_id="forged-move",
            user_id=alpha.user,
            expiration=timedelta(milliseconds=1),
            headers={HEADER_DEAD_QUEUE: topology.team_queue("beta")},
        ),
        "alpha",
    )
    # Expect the operator's listing to show both as alpha's expired jobs
    letters = await dead_letters(settings, 2)
    assert sorted((x.message_id, x.team, x.queue, x.reason) for x in letters) == [
        ("forged-move", "alpha", topology.team_queue("alpha"), "expired"),
        ("forged-usage", "alpha", topology.team_queue("alpha"), "expired"),
    ]
    # When the operator replays every dead letter
    replayed, refused = await dlq.replay(settings)
    # Expect both back on alpha's own queue: nothing reached accounting or beta's queue
    assert len(replayed) == 2 and not refused
    assert await depth(settings, topology.accounting_queue) == 0
    assert await depth(settings, topology.team_queue("beta")) == 0
    assert await depth(settings, topology.team_queue("alpha")) == 2


async def test_a_usage_event_is_replayed_to_accounting_only_when_a_worker_published_it(
    settings: Settings,
) -> None:
    # Given two usage events that expired in the accounting queue (no accountant ran): one
    # published under the workers' user, one under no user at all
    topology = Topology(settings.namespace)
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        usage = await topology.declare_usage(channel)
        await topology.declare_jobs_exchange(channel)  # a replay checks both are there
        for job_id, user in (("by-worker", settings.amqp_user), ("unsigned", None)):
            await usage.publish(
                aio_pika.Message(
                    b"{}", message_id=job_id, user_id=user, expiration=timedelta(milliseconds=1)
                ),
                routing_key="",
            )
    letters = await dead_letters(settings, 2)
    assert {x.queue for x in letters} == {topology.accounting_queue}
    # When the operator replays both
    replayed, refused = await dlq.replay(settings)
    # Expect only the worker's back in accounting, and the other one left, saying why
    assert [x.message_id for x in replayed] == ["by-worker"]
    [(letter, why)] = refused
    assert letter.message_id == "unsigned" and "published by nobody, no worker" in why
    assert await depth(settings, topology.accounting_queue) == 1


async def test_an_expired_job_of_a_broker_identity_team_is_replayed_served_and_counted_once(
    settings: Settings, teams: dict[str, Credentials]
) -> None:
    alpha = teams["alpha"]
    assert alpha.amqp_url is not None
    team_settings = settings.model_copy(update={"amqp_url": alpha.amqp_url})
    # (a gateway serving another team answers the client's request for a reply queue)
    async with (
        running_gateway(settings, teams=("gamma",)),
        GatewayClient(team_settings, team="alpha") as client,
    ):
        # Given a job of alpha's that outlived its message TTL while no worker served alpha
        job = client.job("gpt-4o-mini", HELLO)
        await publish_as(
            alpha,
            settings,
            aio_pika.Message(
                job.model_dump_json().encode(),
                message_id=job.job_id,
                correlation_id=job.job_id,
                reply_to=client.reply_to,
                user_id=alpha.user,
                expiration=timedelta(milliseconds=1),
            ),
            "alpha",
        )
        [letter] = await dead_letters(settings, 1)
        assert letter.reason == "expired" and letter.team == "alpha" and letter.deaths == 1
        async with running_gateway(settings, teams=("alpha",)) as gw:
            # When the operator replays it
            replayed, refused = await dlq.replay(settings, {job.job_id})
            assert [x.message_id for x in replayed] == [job.job_id] and not refused
            # Expect it served once, and accounted once under the operator, naming alpha's user
            result = await client.wait(job.job_id, timeout=10)
            assert result.status == "ok", result.error
            [row] = await gw.usage_rows(1)
            assert row["identity"] == (
                f"operator:{settings.amqp_user}(replay of broker:{alpha.user})"
            )
            assert gw.mock.stats.calls == 1
            assert (await dlq.peek(settings))[1] == 0


async def test_a_replay_refused_again_keeps_the_first_cause(
    settings: Settings, teams: dict[str, Credentials]
) -> None:
    # Given a job alpha forged for beta, which expired in alpha's queue
    alpha = teams["alpha"]
    job = ChatJob.model_validate(
        {"job_id": "forged-1", "team": "beta", "model": "gpt-4o-mini", "messages": HELLO}
    )
    await publish_as(
        alpha,
        settings,
        aio_pika.Message(
            job.model_dump_json().encode(),
            message_id=job.job_id,
            user_id=alpha.user,
            expiration=timedelta(milliseconds=1),
        ),
        "alpha",
    )
    await dead_letters(settings, 1)
    async with running_gateway(settings, teams=("alpha", "beta")) as gw:
        # When the operator replays it, and the worker refuses it
        await dlq.replay(settings, {"forged-1"})
        [row] = await gw.usage_rows(1)
        # Expect the refusal audited with who claimed it and for which model
        assert row["error_code"] == "unauthorized" and row["model_requested"] == "gpt-4o-mini"
        assert row["identity"] == f"claimed:user_id={settings.amqp_user}"
        assert gw.mock.stats.calls == 0
    # ... and the dead letter still saying why it first died, then why the replay did
    [letter] = await dead_letters(settings, 1)
    assert letter.reason == "expired" and letter.team == "alpha"
    assert letter.then is not None and letter.then.startswith("unauthorized: job for team 'beta'")


async def test_a_worker_keeps_only_the_head_of_an_oversized_job_and_says_so(
    settings: Settings,
) -> None:
    # Given a worker that accepts jobs of up to 1 MiB, when a job of 1.5 MiB arrives
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        big = [{"role": "user", "content": "x" * 1_500_000}]
        result = await client.chat("gpt-4o-mini", big, timeout=10)
        assert result.error is not None and result.error.code == "invalid_request"
    # Expect its dead letter cut to the limit, saying how big it was, and not replayable
    [letter] = await dead_letters(settings, 1)
    assert len(letter.body) == DEAD_BODY_LIMIT
    assert letter.truncated is not None and letter.truncated > 1_500_000
    assert letter.headers[HEADER_DEAD_TRUNCATED] == letter.truncated
    replayed, [(_, why)] = await dlq.replay(settings)
    assert not replayed and "cut from" in why


async def test_the_dead_letter_queues_are_bounded(settings: Settings) -> None:
    # Given the dead-letter queues as every component declares them: accounting's as each
    # process starts (and teams add), and a team's as its job queue is declared
    topology = Topology(settings.namespace)
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        await topology.declare_dead(channel)
        await topology.declare_team_queue(channel, "alpha")
    async with BrokerAdmin.of(settings) as admin:
        queues = [await admin.queue(topology.dead_queue)]
        queues.append(await admin.queue(topology.team_dead_queue("alpha")))
    # Expect a length and a byte bound, dropping the oldest letters rather than refusing any
    for queue in queues:
        assert queue is not None
        arguments = queue["arguments"]
        assert arguments["x-max-length"] > 0 and arguments["x-max-length-bytes"] > 0
        assert arguments["x-overflow"] == "drop-head"
        # ... and a delivery limit out of reach, so that listing letters never drops one
        assert arguments["x-delivery-limit"] >= 1_000_000


async def test_an_operators_replay_never_turns_a_refused_forgery_into_a_served_job(
    settings: Settings, teams: dict[str, Credentials]
) -> None:
    # Given a user that may publish under alpha's key but is not alpha's (an app user shared
    # by several teams, say), whose job for alpha was refused and dead-lettered
    user, password = f"{settings.namespace}.outsider", uuid.uuid4().hex
    await create_broker_user(settings, "alpha", user, password, TeamConfig())
    try:
        parts = urlsplit(settings.amqp_url)
        netloc = f"{quote(user)}:{password}@{parts.hostname}:{parts.port or 5672}"
        outsider = Credentials("broker", user, password, urlunsplit(parts._replace(netloc=netloc)))
        async with running_gateway(settings, teams=("alpha",)) as gw:
            job = ChatJob.model_validate(
                {"job_id": "forged-2", "team": "alpha", "model": "gpt-4o-mini", "messages": HELLO}
            )
            message = aio_pika.Message(
                job.model_dump_json().encode(), message_id=job.job_id, user_id=outsider.user
            )
            await publish_as(outsider, settings, message, "alpha")
            [letter] = await dead_letters(settings, 1)
            assert letter.reason == "unauthorized" and letter.team == "alpha"
            # When the operator replays it
            replayed, [(kept, why)] = await dlq.replay(settings)
            # Expect it left a dead letter, refused `unauthorized` as it was (to no one: it
            # named no reply queue), never served: one refusal row (a forgery that expired
            # instead is proven again: see above)
            assert not replayed and kept.message_id == "forged-2"
            assert why.startswith("refused unauthorized, an answer that reached no one")
            [again] = await dead_letters(settings, 1)
            rows = await gw.usage_rows(1)
            assert [row["error_code"] for row in rows] == ["unauthorized"]
            assert gw.mock.stats.calls == 0
        assert again.reason == "unauthorized" and again.then is None
    finally:
        async with BrokerAdmin.of(settings) as admin:
            await admin.delete_user(user)


async def test_a_team_flooding_the_dead_letters_drops_only_its_own(
    settings: Settings, teams: dict[str, Credentials]
) -> None:
    alpha, beta = teams["alpha"], teams["beta"]
    topology = Topology(settings.namespace)
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:  # as a worker does: a replay checks its exchanges are there
        await topology.declare_usage(await connection.channel())
    # Given a dead letter of beta's: a job that expired in its queue, as an operator would
    # inspect and replay it
    await publish_as(
        beta,
        settings,
        aio_pika.Message(
            b"{}", message_id="beta-1", user_id=beta.user, expiration=timedelta(milliseconds=1)
        ),
        "beta",
    )
    await dead_letters(settings, 1)
    # When alpha, with its own user, publishes more jobs that expire at once than the dead
    # letters of the whole namespace once held in bytes (a margin for those on their way)
    body = b"x" * 1024 * 1024
    flood = DEAD_MAX_BYTES // len(body) + 16
    assert alpha.amqp_url is not None
    connection = await aio_pika.connect(alpha.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(topology.entry_exchange("alpha"))
        for start in range(0, flood, 8):
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(
                            body,
                            message_id=f"alpha-{n}",
                            user_id=alpha.user,
                            expiration=timedelta(milliseconds=1),
                        ),
                        routing_key="alpha",
                    )
                    for n in range(start, start + 8)
                )
            )
    await drained(settings, topology.team_queue("alpha"))
    # Expect beta's letter still there and listed for beta, and alpha's held to its own bound
    letters, total = await dlq.peek(settings, team="beta")
    assert [x.message_id for x in letters] == ["beta-1"]
    assert total <= TEAM_DEAD_MAX_BYTES // len(body) + 1
    # ... and the operator's replay and purge reaching both teams' letters
    replayed, refused = await dlq.replay(settings, {"beta-1"})
    assert [x.message_id for x in replayed] == ["beta-1"] and not refused
    assert await depth(settings, topology.team_queue("beta")) == 1
    assert await dlq.purge(settings) == total - 1
    assert (await dlq.peek(settings))[1] == 0


async def test_a_teams_cc_header_adds_none_of_its_dead_letters_to_accounting_s(
    settings: Settings, teams: dict[str, Credentials]
) -> None:
    alpha = teams["alpha"]
    topology = Topology(settings.namespace)
    # When alpha publishes under its own key a job that expires at once, its CC header adding
    # the key under which accounting's dead letters are kept (which RabbitMQ before 4.0.3 does
    # not check against alpha's permissions), then one without
    for job_id, headers in (("cc-1", {"CC": [""]}), ("plain-1", {})):
        await publish_as(
            alpha,
            settings,
            aio_pika.Message(
                b"{}",
                message_id=job_id,
                user_id=alpha.user,
                expiration=timedelta(milliseconds=1),
                headers=headers,
            ),
            "alpha",
        )
    # Expect both among alpha's own dead letters alone: its quota policy dead-letters them
    # under alpha's key only
    letters = await dead_letters(settings, 2)
    assert sorted(x.message_id or "" for x in letters) == ["cc-1", "plain-1"]
    assert await depth(settings, topology.team_dead_queue("alpha")) == 2
    assert await depth(settings, topology.dead_queue) == 0


async def test_an_earlier_versions_shared_dead_letters_are_kept_and_no_longer_flooded(
    settings: Settings,
) -> None:
    topology = Topology(settings.namespace)
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        # Given the dead letters as an earlier version declared them: one queue bound to the
        # fanout every queue dead-letters to, holding a letter of beta's
        channel = await connection.channel(publisher_confirms=True)
        fanout = await channel.declare_exchange(
            topology.dead_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        shared = await channel.declare_queue(
            topology.dead_queue,
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-delivery-limit": 1_000_000_000,
                "x-max-length": DEAD_MAX_LENGTH,
                "x-max-length-bytes": DEAD_MAX_BYTES,
                "x-overflow": "drop-head",
            },
        )
        await shared.bind(fanout)
        await fanout.publish(aio_pika.Message(b"{}", message_id="beta-old"), routing_key="")
        # When this version starts (each process, and teams add, declares the dead letters)
        # and declares alpha's queues, and alpha's job expires at once
        await topology.declare_dead(channel)
        await topology.declare_team_queue(channel, "alpha")
        jobs = await channel.get_exchange(topology.jobs_exchange)
        await jobs.publish(
            aio_pika.Message(b"{}", message_id="alpha-1", expiration=timedelta(milliseconds=1)),
            routing_key="alpha",
        )
    # Expect alpha's letter in alpha's own queue alone, the earlier letter where it was, and
    # the operator's listing showing both
    letters = await dead_letters(settings, 2)
    assert sorted(x.message_id or "" for x in letters) == ["alpha-1", "beta-old"]
    assert await depth(settings, topology.team_dead_queue("alpha")) == 1
    assert await depth(settings, topology.dead_queue) == 1
