"""The control plane on the real broker: teams declare nothing, the gateway declares for them.

Each attack is made as a hostile team would, with the team's own broker credentials.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import aio_pika
import pytest
import redis.asyncio as aioredis
from aiormq.exceptions import ChannelAccessRefused, ChannelNotFoundEntity, DeliveryError

import workers.batch_state
import workers.control
import workers.control_pace
from admin.teams import (
    Credentials,
    create_broker_user,
    disable,
    in_force,
    register,
    set_security,
    with_user,
)
from producer import GatewayClient
from producer.batch.state import BatchState
from producer.reply_queues import delete_reply_queue
from queuegate.control import (
    DIRECT_REPLY_TO,
    HEADER_REQUEST,
    MAX_CUSTOM_ID,
    STEP_MAX,
    BatchCall,
    BatchMeta,
    CloseReplyQueue,
    ControlRequest,
    ControlResponse,
    OpenReplyQueue,
)
from queuegate.errors import BatchError, ControlRefused, ServiceUnavailable, TeamDisabled
from queuegate.keys import Keys
from queuegate.management import BrokerAdmin
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from queuegate.signing import sign_job
from queuegate.topology import CONTROL_MAX_BYTES, CONTROL_MAX_LENGTH, Topology
from tests.faults import RECONNECT_INTERVAL
from tests.support import exists, logged, reconnects, running_gateway, wait_until
from tests.test_team_connections import consumed_on

HELLO = [{"role": "user", "content": "Hello there"}]


async def flood_control(
    connection: aio_pika.abc.AbstractConnection, settings: Settings, team: Credentials
) -> list[object]:
    """Twice as many control requests as alpha's control queue holds, sent at once as alpha;
    what each publish came to (a refusal past the bound is a DeliveryError)."""
    assert team.user is not None
    channel = await connection.channel(publisher_confirms=True)
    replies = await channel.get_queue(DIRECT_REPLY_TO, ensure=False)
    await replies.consume(ignore, no_ack=True)
    exchange = await channel.get_exchange(alpha_entry(settings), ensure=False)
    flood = [
        exchange.publish(
            control_message(
                OpenReplyQueue(name="flood"),
                team="alpha",
                reply_to=DIRECT_REPLY_TO,
                user=team.user,
                key=None,
            ),
            routing_key="alpha.control",
        )
        for _ in range(2 * CONTROL_MAX_LENGTH)
    ]
    return await asyncio.gather(*flood, return_exceptions=True)


def alpha_entry(settings: Settings) -> str:
    """Where alpha's apps publish: the only exchange its user may write to."""
    return Topology(settings.namespace).entry_exchange("alpha")


def as_team(settings: Settings, credentials: Credentials) -> Settings:
    assert credentials.amqp_url is not None
    return settings.model_copy(update={"amqp_url": credentials.amqp_url})


async def beta_depth(settings: Settings) -> int:
    async with BrokerAdmin.of(settings) as admin:
        queue = await admin.queue(f"{settings.namespace}.jobs.beta")
    assert queue is not None
    return int(queue.get("messages", 0))


async def test_a_teams_control_queue_refuses_requests_past_its_bytes(
    settings: Settings, teams: dict[str, Credentials]
) -> None:
    # Given team alpha added the default way, and no worker taking its control requests
    alpha = teams["alpha"]
    assert alpha.amqp_url is not None
    size = 4 * 1024 * 1024

    # When alpha publishes 4 MiB control requests with its own broker user, until refused
    accepted = 0
    connection = await aio_pika.connect(alpha.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(alpha_entry(settings), ensure=False)
        with pytest.raises(DeliveryError):
            for _ in range(CONTROL_MAX_BYTES // size + 2):
                message = aio_pika.Message(b"x" * size, user_id=alpha.user)
                await exchange.publish(message, routing_key="alpha.control")
                accepted += 1

    # Expect the bound in bytes to hold (a quorum queue may take one more), far below
    # CONTROL_MAX_LENGTH requests of that size
    assert accepted in (CONTROL_MAX_BYTES // size, CONTROL_MAX_BYTES // size + 1)


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
        async with BrokerAdmin.of(settings) as admin:
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
            exchange = await channel.get_exchange(alpha_entry(settings), ensure=False)
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


async def test_concurrent_opens_never_take_more_reply_queues_than_the_teams_limit(
    settings: Settings, teams: dict[str, Credentials], redis_client: aioredis.Redis
) -> None:
    # Given a limit of three reply queues per team
    settings = settings.model_copy(update={"reply_queues_per_team": 3})
    alpha = as_team(settings, teams["alpha"])
    opened: list[str] = []
    refused: list[str] = []
    answered, release = asyncio.Event(), asyncio.Event()
    attempts = 40

    async def open_and_hold(name: str) -> None:
        try:
            async with GatewayClient(alpha, team="alpha", reply_queue=name):
                opened.append(name)
                if len(opened) + len(refused) == attempts:
                    answered.set()
                await release.wait()
        except ControlRefused:
            refused.append(name)
            if len(opened) + len(refused) == attempts:
                answered.set()

    async with running_gateway(settings, teams=("alpha",)):
        # When alpha's apps ask for 40 reply queues at once, each holding what it gets
        holders = [asyncio.create_task(open_and_hold(f"r{i}")) for i in range(attempts)]
        await asyncio.wait_for(answered.wait(), 60)
        counted = await redis_client.zcard(Keys(settings.redis_prefix).reply_queues("alpha"))
        release.set()
        await asyncio.gather(*holders)
    # Expect the limit held: three opened and counted, every other one refused
    assert (len(opened), counted, len(refused)) == (3, 3, attempts - 3)


async def test_a_reply_queue_the_broker_refuses_to_declare_takes_no_slot(
    settings: Settings, teams: dict[str, Credentials], redis_client: aioredis.Redis
) -> None:
    # Given a queue under the name of alpha's named reply queue, there with other arguments
    taken = Topology.of(settings).results_queue("alpha", "taken")
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection, running_gateway(settings, teams=("alpha",)):
        channel = await connection.channel()
        await channel.declare_queue(taken, durable=True)
        try:
            # When alpha's app asks for it, the declare fails
            with pytest.raises(ServiceUnavailable):
                async with GatewayClient(
                    as_team(settings, teams["alpha"]), team="alpha", reply_queue="taken"
                ):
                    pass
        finally:
            await channel.queue_delete(taken)
    # Expect the slot given back: a failed declare does not use up the team's limit
    assert await redis_client.zcard(Keys(settings.redis_prefix).reply_queues("alpha")) == 0


async def test_a_wrong_api_key_opens_no_reply_queue(
    settings: Settings, teams: dict[str, Credentials]
) -> None:
    # Given alpha proves itself with an API key, its apps sharing a user that is no operator
    async with alpha_app(settings, teams, "api_key") as app, running_gateway(settings):
        # When a client brings another key, expect the gateway to refuse its control request
        with pytest.raises(ControlRefused, match="unknown or revoked"):
            async with GatewayClient(
                app.settings, team="alpha", api_key="qg_000000000000_" + "x" * 43
            ):
                pass
        # ... and the right key to be served
        async with GatewayClient(app.settings, team="alpha", api_key=app.api_key) as client:
            result = await client.chat("gpt-4o-mini", HELLO, timeout=10)
            assert result.status == "ok", result.error


@dataclass(frozen=True)
class App:
    """Team alpha's app as an attacker runs it: its broker settings, the ``user_id`` it
    publishes under, the API key it signs with (None: it signs nothing) and the one its
    legitimate client uses."""

    settings: Settings
    user: str
    signs_with: str | None
    api_key: str | None


@asynccontextmanager
async def alpha_app(
    settings: Settings, teams: dict[str, Credentials], identity: str
) -> AsyncIterator[App]:
    """``broker``: alpha's own user; ``api_key`` / ``unsigned``: alpha identified by API key,
    its app connecting as a user shared by apps (no operator), signing or not."""
    alpha = teams["alpha"]
    if identity == "broker":
        assert alpha.user is not None
        yield App(as_team(settings, alpha), alpha.user, None, None)
        return
    _, credentials = await set_security(settings, "alpha", identity="api_key")
    assert credentials is not None and credentials.api_key is not None
    user, password = f"{settings.namespace}.apps", uuid.uuid4().hex
    await create_broker_user(settings, "alpha", user, password, TeamConfig())
    apps = settings.model_copy(update={"amqp_url": with_user(settings.amqp_url, user, password)})
    signs_with = credentials.api_key if identity == "api_key" else None
    try:
        yield App(apps, user, signs_with, credentials.api_key)
    finally:
        async with BrokerAdmin.of(settings) as admin:
            await admin.delete_user(user)


def control_message(
    request: OpenReplyQueue | CloseReplyQueue | BatchCall,
    *,
    team: str,
    reply_to: str,
    user: str,
    key: str | None,
    sent: datetime | None = None,
    wait_s: int | None = None,
    copy_of: str | None = None,
) -> aio_pika.Message:
    """A control request as a client sends it; ``sent`` and ``wait_s``: its timestamp and
    its time to live (the wait its client had left); ``copy_of``: the request it is a copy
    of (``HEADER_REQUEST``)."""
    body = ControlRequest(request=request).model_dump_json().encode()
    request_id = uuid.uuid4().hex
    proof = None if key is None else sign_job(key, job_id=request_id, team=team, body=body)
    return aio_pika.Message(
        body,
        message_id=request_id,
        correlation_id=request_id,
        reply_to=reply_to,
        user_id=user,
        timestamp=sent,
        expiration=None if wait_s is None else wait_s,
        headers={
            **({} if proof is None else dict(proof)),
            **({} if copy_of is None else {HEADER_REQUEST: copy_of}),
        },
    )


async def depth(settings: Settings, queue: str) -> int:
    """Messages ready in ``queue`` (0 when it does not exist), by a passive declare."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        try:
            declared = await (await connection.channel()).declare_queue(queue, passive=True)
        except ChannelNotFoundEntity:
            return 0
        return int(declared.declaration_result.message_count or 0)


async def ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    """A consumer of the answers nobody waits for."""


@pytest.mark.parametrize("identity", ["broker", "api_key", "unsigned"])
async def test_a_control_answer_goes_to_direct_reply_to_only_never_to_another_teams_queue(
    settings: Settings, teams: dict[str, Credentials], identity: str
) -> None:
    topology = Topology(settings.namespace)
    async with (
        alpha_app(settings, teams, identity) as app,
        running_gateway(settings, teams=("alpha", "beta")) as gw,
        GatewayClient(as_team(settings, teams["beta"]), team="beta", reply_queue="nightly") as b,
    ):
        victims = [
            topology.team_queue("beta"),
            b.reply_to,
            topology.accounting_queue,
            topology.dead_queue,
            topology.team_dead_queue("beta"),
        ]
        # When alpha's app sends its own control requests (signed, or not: a refusal would
        # be answered too) naming beta's queues, accounting or the dead letters as reply_to
        connection = await aio_pika.connect(app.settings.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(alpha_entry(settings), ensure=False)
            for victim in victims:
                for request in (OpenReplyQueue(name="evil"), BatchCall(call="list")):
                    message = control_message(
                        request, team="alpha", reply_to=victim, user=app.user, key=app.signs_with
                    )
                    await exchange.publish(message, routing_key="alpha.control")
        # ... and the worker has taken them all, and still answers alpha's own client
        async with asyncio.timeout(10):
            while True:  # the broker announces no empty queue: look again
                if not await depth(settings, topology.control_queue("alpha")):
                    break
                await asyncio.sleep(0.01)
        async with GatewayClient(app.settings, team="alpha", api_key=app.api_key):
            pass
        usage = await gw.pool.fetchval("SELECT count(*) FROM usage_log WHERE team = 'beta'")
    # Expect nothing in any of those queues, no usage row for beta
    assert usage == 0
    for victim in victims:
        assert await depth(settings, victim) == 0, victim


async def test_a_teams_flood_of_control_requests_does_not_hold_up_another_teams(
    settings: Settings, teams: dict[str, Credentials]
) -> None:
    topology = Topology(settings.namespace)
    alpha = teams["alpha"]
    assert alpha.amqp_url is not None and alpha.user is not None
    async with running_gateway(settings, teams=("alpha", "beta")):
        connection = await aio_pika.connect(alpha.amqp_url)
        async with connection:
            # Given alpha floods its control queue, without waiting for any answer
            sent = await flood_control(connection, settings, alpha)
            # When beta opens a client (one control request) while alpha's backlog waits
            async with GatewayClient(as_team(settings, teams["beta"]), team="beta"):
                backlog = await depth(settings, topology.control_queue("alpha"))
    # Expect beta answered before alpha's backlog was drained, and the broker to have
    # refused what went past alpha's bound
    assert backlog > 0
    assert any(isinstance(result, DeliveryError) for result in sent)


def pace_at(monkeypatch: pytest.MonkeyPatch, rate: int) -> None:
    """Workers started after this pace each team's control requests at ``rate`` bytes a
    second, ``rate`` bytes at once after a quiet spell."""
    monkeypatch.setattr(workers.control_pace, "RATE", rate)
    monkeypatch.setattr(workers.control_pace, "BURST", rate)


async def test_a_teams_control_requests_wait_their_turn_and_another_teams_do_not(
    settings: Settings,
    teams: dict[str, Credentials],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a worker that carries out 30 KB of a team's control requests a second, with a
    # burst of 30 KB (1 MB and 4 MB in earnest), each request costing 10 KB beside its bytes
    pace_at(monkeypatch, 30_000)
    caplog.set_level(logging.INFO, logger="workers.control")
    async with (
        running_gateway(settings, teams=("alpha", "beta")),
        GatewayClient(as_team(settings, teams["alpha"]), team="alpha") as alpha,
        GatewayClient(as_team(settings, teams["beta"]), team="beta") as beta,
    ):
        answered: dict[str, float] = {}

        async def ask(client: GatewayClient, name: str) -> None:
            await client.control.batch("list")
            answered[name] = time.monotonic()

        # When alpha's app sends 12 requests at once (before: carried out back to back, and
        # a flood of them took a worker from every other team), then beta's app one
        started = time.monotonic()
        flood = [asyncio.create_task(ask(alpha, f"alpha-{i}")) for i in range(12)]
        await ask(beta, "beta")
        await asyncio.gather(*flood)
    # Expect alpha's carried out at its pace: the last no sooner than 122 KB less the burst
    # at 30 KB/s (3.1 s) after they were sent, and beta's answered while alpha's still waited
    last = max(at for name, at in answered.items() if name.startswith("alpha"))
    assert last - started >= 2.5, last - started
    assert answered["beta"] < last
    # and the operator told, once, whose requests wait, and not beta's
    paced = [r.getMessage() for r in caplog.records if "wait their turn" in r.getMessage()]
    assert len(paced) == 1 and "team alpha" in paced[0], paced


async def test_a_step_of_a_few_bytes_with_a_large_answer_waits_for_what_it_answers(
    settings: Settings,
    teams: dict[str, Credentials],
    redis_client: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given alpha's batch of 1,000 lines, custom ids of 64 characters, none written yet, and
    # a worker carrying out 200 KB of a team's control requests a second, 200 KB at once
    keys = Keys(settings.redis_prefix)
    state = workers.batch_state.BatchState(redis_client, keys, "alpha", "big", "ab12")
    await state.index([(f"{i:064d}", i + 1) for i in range(1_000)])
    meta = BatchMeta(
        name="big",
        team="alpha",
        format="openai",
        total=1_000,
        deadline=datetime.now(UTC) + timedelta(hours=1),
        fingerprint="f" * 64,
        submission="s1",
    )

    async def declared() -> None:
        pass

    await state.create(meta, declared)
    pace_at(monkeypatch, 200_000)
    async with (
        running_gateway(settings, teams=("alpha",)),
        GatewayClient(as_team(settings, teams["alpha"]), team="alpha") as alpha,
    ):
        # When alpha's app sends 8 `unwritten` steps at once: 90 bytes each, each answered
        # with its 1,000 ids (about 70 KB)
        started = time.monotonic()
        pages = await asyncio.gather(
            *(alpha.control.batch("unwritten", "big", cursor=0) for _ in range(8))
        )
        took = time.monotonic() - started
    # Expect each answered whole, at the pace of what they answered: the last four (the
    # worker takes 4 at once) wait for the first four's answers, 4 x 78 KB and 8 x 10 KB less
    # the burst, at 200 KB/s: 1 s (before, charged by their requests alone, 30 ms)
    assert all(len(page[1]) == 1_000 for page in pages)
    assert took >= 0.6, took


async def test_a_client_whose_control_request_the_broker_refuses_says_so_in_one_line(
    settings: Settings, teams: dict[str, Credentials]
) -> None:
    # Given alpha's control queue full (no worker serving it), as a cluster's is while its
    # members elect a leader: the broker refuses (nacks) every request
    alpha = teams["alpha"]
    assert alpha.amqp_url is not None and alpha.user is not None
    connection = await aio_pika.connect(alpha.amqp_url)
    async with connection:
        sent = await flood_control(connection, settings, alpha)
    assert any(isinstance(result, DeliveryError) for result in sent)  # full
    # When alpha opens a client
    with pytest.raises(ServiceUnavailable) as refused:
        async with GatewayClient(as_team(settings, alpha), team="alpha"):
            pass
    # Expect one line saying the broker refused the request and what to do, not a bare nack
    said = str(refused.value)
    assert "the broker refused the request to the gateway" in said and "\n" not in said, said
    assert "try again" in said


async def test_a_malformed_batch_step_is_refused_in_one_line_naming_what_is_missing(
    settings: Settings, teams: dict[str, Credentials], redis_client: aioredis.Redis
) -> None:
    topology = Topology(settings.namespace)
    meta = {
        "name": "raw",
        "team": "alpha",
        "format": "openai",
        "total": 1,
        "deadline": (datetime.now(UTC) + timedelta(hours=1)).isoformat(),
        "fingerprint": "0" * 64,
    }
    async with (
        running_gateway(settings, teams=("alpha",)),
        GatewayClient(as_team(settings, teams["alpha"]), team="alpha") as client,
    ):
        # When alpha's app sends raw batch steps: create before any index of its run, then
        # create and index without their arguments
        with pytest.raises(BatchError) as unindexed:
            await client.control.batch("create", "raw", meta=meta, run="ab12")
        with pytest.raises(ControlRefused) as no_meta:
            await client.control.batch("create", "raw", run="ab12")
        with pytest.raises(ControlRefused) as no_entries:
            await client.control.batch("index", "raw", run="ab12")

        # Expect each refused as the bad request it is, in one line naming what is missing
        said = [str(e.value) for e in (unindexed, no_meta, no_entries)]
        assert all("\n" not in s for s in said), said
        assert "no index of run 'ab12'" in said[0] and "batch index" in said[0]
        assert "needs argument 'meta'" in said[1]
        assert "needs argument 'entries'" in said[2]
        # ... leaving nothing behind: no batch, no results queue nor its slot
        assert await client.control.batch("load", "raw") is None
        results = topology.results_queue("alpha", "raw")
        async with BrokerAdmin.of(settings) as admin:
            assert await admin.queue(results) is None
        slots = Keys(settings.redis_prefix).reply_queues("alpha")
        assert await redis_client.zscore(slots, results) is None

        # ... and the steps in their order still create the batch
        await client.control.batch("reset_index", "raw", run="ab12")
        assert await client.control.batch("index", "raw", entries=[["a", 1]], run="ab12") == [1]
        assert await client.control.batch("create", "raw", meta=meta, run="ab12") == ""
        assert (await client.control.batch("load", "raw"))["total"] == 1
        await client.control.batch("delete", "raw")


async def test_a_batch_step_past_what_a_worker_takes_is_refused_unread_and_stores_nothing(
    settings: Settings, teams: dict[str, Credentials], redis_client: aioredis.Redis
) -> None:
    # Given a team added the default way, its app sending raw batch steps (the CLI sends
    # STEP_MAX custom ids a step at most)
    async with (
        running_gateway(settings, teams=("alpha",)),
        GatewayClient(as_team(settings, teams["alpha"]), team="alpha") as client,
    ):
        index = [[f"id-{i:08d}", i + 1] for i in range(200_000)]
        # When one index step holds 200,000 custom ids (5 MB: ten such held a worker, and
        # every other team's jobs with it, for 11 s, and stored 12 MB each in Redis), one
        # 1,001, and one an id past MAX_CUSTOM_ID
        steps = [index, index[: STEP_MAX + 1], [["x" * (MAX_CUSTOM_ID + 1), 1]]]
        said = []
        for entries in steps:
            with pytest.raises(ControlRefused) as refused:
                await client.control.batch("index", "flood", entries=entries, run="ab12")
            said.append(str(refused.value))
        # Expect each refused in one line saying what a worker takes, nothing stored
        assert "is larger than the 1,048,576 a worker reads" in said[0], said[0]
        assert "1,000 at a time" in said[0]
        assert "argument entries is not valid: List should have at most 1000 items" in said[1]
        assert "argument entries.0.0 is not valid" in said[2], said[2]
        assert all("\n" not in s for s in said), said
        assert not [key async for key in redis_client.scan_iter(f"{settings.redis_prefix}*flood*")]
        # ... and STEP_MAX at once taken, and more through a batch's state, in steps
        assert await client.control.batch("index", "flood", entries=index[:STEP_MAX], run="ab12")
        lines = [(f"s-{i}", i + 1) for i in range(2_500)]
        assert await BatchState(client.control, "split").index(lines) == list(range(1, 2_501))


async def test_a_teams_batch_steps_record_no_more_ids_an_hour_than_its_bound(
    settings: Settings,
    teams: dict[str, Credentials],
    redis_client: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a bound of 2,500 custom ids an hour (2,000,000 in earnest)
    monkeypatch.setattr(workers.control, "BATCH_IDS_PER_HOUR", 2_500)
    async with (
        running_gateway(settings, teams=("alpha", "beta")),
        GatewayClient(as_team(settings, teams["alpha"]), team="alpha") as alpha,
        GatewayClient(as_team(settings, teams["beta"]), team="beta") as beta,
    ):
        entries = [[f"id-{i:05d}", i + 1] for i in range(STEP_MAX)]
        # When alpha's app sends index steps of 1,000 new ids under runs of its choosing (before:
        # any number, each stored for an hour: 80 MB a second of the shared Redis)
        for run in ("aa01", "aa02"):
            await alpha.control.batch("index", "flood", entries=entries, run=run)
        with pytest.raises(ControlRefused) as refused:
            await alpha.control.batch("index", "flood", entries=entries, run="aa03")
        # Expect the third refused in one line saying when it may go on, nothing of it stored,
        # and another team's steps taken as ever
        said = str(refused.value)
        assert "batch steps recorded 2,500 custom ids this hour, the most a team may" in said
        assert "\n" not in said
        key = Keys(settings.redis_prefix).batch_index("alpha", "flood", "aa03")
        assert not await redis_client.exists(key)
        assert await beta.control.batch("index", "flood", entries=entries, run="bb01")


UNDECODABLE = "amq.rabbitmq.reply-to.g1h2AA5yZWJiaXRAdm0AAAAAAAAAAQAAAAA=.abc"
"""A direct reply-to name RabbitMQ 3.10 cannot decode (a node name longer than its bytes): the
channel that publishes to it crashes, and the broker closes its connection (541)."""


async def ask_undecodable(settings: Settings, app: App, requests: int) -> None:
    """Publish ``requests`` control requests of alpha's, by its app, each asking for its answer
    at UNDECODABLE."""
    connection = await aio_pika.connect(app.settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(alpha_entry(settings), ensure=False)
        for _ in range(requests):
            message = control_message(
                OpenReplyQueue(name="evil"),
                team="alpha",
                reply_to=UNDECODABLE,
                user=app.user,
                key=app.signs_with,
            )
            await exchange.publish(message, routing_key="alpha.control")


@pytest.mark.parametrize("identity", ["broker", "api_key"])
async def test_a_control_answer_the_broker_cannot_deliver_drops_no_workers_connection(
    settings: Settings, teams: dict[str, Credentials], identity: str
) -> None:
    async with (
        alpha_app(settings, teams, identity) as app,
        running_gateway(settings, teams=("alpha", "beta")),
        GatewayClient(as_team(settings, teams["beta"]), team="beta") as beta,
    ):
        worker, alpha, beta_ = (
            reconnects("worker"),
            reconnects("team", "alpha"),
            reconnects("team", "beta"),
        )
        # When alpha's app asks for its answers at a direct reply-to name the broker cannot
        # decode, with alpha's own credentials
        with logged("aiormq.connection", "Unexpected connection close") as crashed:
            await ask_undecodable(settings, app, 1)
            # (the broker closed the connection that answer went on)
            await crashed.wait()
        # Expect beta served, alpha's own client answered again, and the worker's connection
        # and beta's kept: only alpha's own, its answers go on, was made again
        assert (await beta.chat("gpt-4o-mini", HELLO, timeout=30)).status == "ok"
        async with GatewayClient(app.settings, team="alpha", api_key=app.api_key):
            pass
        assert reconnects("worker") == worker
        assert reconnects("team", "beta") == beta_
        assert reconnects("team", "alpha") == alpha + 1


@pytest.mark.parametrize("identity", ["broker", "api_key"])
async def test_a_teams_waiting_requests_that_close_its_connection_stop_no_worker_starting(
    settings: Settings, teams: dict[str, Credentials], identity: str
) -> None:
    components = settings.model_copy(
        update={"amqp_url": f"{settings.amqp_url}?reconnect_interval={RECONNECT_INTERVAL}"}
    )
    async with alpha_app(settings, teams, identity) as app:
        # Given alpha's app has left requests waiting for the workers, each asking for its
        # answer at a direct reply-to name the broker cannot decode (each answer closes the
        # connection it goes on)
        await ask_undecodable(settings, app, POISONED)
        assert await depth(settings, Topology.of(settings).control_queue("alpha")) == POISONED
        alpha = reconnects("team", "alpha")

        # When a worker starts, its connection of alpha's closed again and again as it does
        async with (
            running_gateway(components, teams=("alpha", "beta")),
            GatewayClient(as_team(settings, teams["beta"]), team="beta") as beta,
        ):
            # Expect it to serve beta, and to consume alpha's jobs too once its connection is
            # back (alpha's own answers meanwhile are lost with the connection they go on)
            assert (await beta.chat("gpt-4o-mini", HELLO, timeout=30)).status == "ok"
            await wait_until(lambda: reconnects("team", "alpha") > alpha)
            await consumed_on(settings, "alpha")


POISONED = 8
"""Requests waiting: enough that alpha's connection is closed while the worker starts."""


@pytest.mark.parametrize("named", [False, True], ids=["every_team", "named_team"])
@pytest.mark.parametrize("identity", ["broker", "api_key"])
async def test_a_disabled_teams_app_is_told_so_at_once_and_served_once_it_is_enabled(
    settings: Settings, teams: dict[str, Credentials], identity: str, named: bool
) -> None:
    # (a worker of every enabled team, or one told to serve alpha by name: answered as
    # alpha's before, though disabled)
    async with (
        alpha_app(settings, teams, identity) as app,
        running_gateway(settings, teams=("alpha", "beta") if named else ()),
    ):
        # Given an operator disabled alpha, every live worker confirming it
        change = await disable(settings, "alpha")
        assert change is not None
        assert (await in_force(settings, change, 5)).pending == []
        # When alpha's app starts (asking the gateway for its reply queue), expect it refused
        # in one line that says what to do, well before its wait for an answer (30 s) ends
        with pytest.raises(TeamDisabled) as refused:
            async with (
                asyncio.timeout(10),
                GatewayClient(app.settings, team="alpha", api_key=app.api_key),
            ):
                pass
        assert str(refused.value) == (
            "team alpha is disabled: ask an operator to enable it again (queuegate teams add alpha)"
        )
        # ... and served again once an operator enables it
        again = await register(settings, "alpha")
        assert again.enabled_again and again.change is not None
        assert (await in_force(settings, again.change, 5)).pending == []
        async with GatewayClient(app.settings, team="alpha", api_key=app.api_key) as alpha:
            assert (await alpha.chat("gpt-4o-mini", HELLO, timeout=30)).status == "ok"


@pytest.mark.parametrize("identity", ["broker", "api_key"])
async def test_an_app_starting_while_a_worker_holds_its_request_is_answered_by_another(
    settings: Settings,
    teams: dict[str, Credentials],
    identity: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "workers.control")
    async with alpha_app(settings, teams, identity) as app:
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            # Given a stalled consumer of alpha's control requests (a worker stopped, its
            # loop hung), the only one when alpha's app asks for its reply queue
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=1)
            queue = await channel.get_queue(
                Topology.of(settings).control_queue("alpha"), ensure=False
            )
            held: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
            await queue.consume(held.put)
            starting = asyncio.create_task(
                GatewayClient(app.settings, team="alpha", api_key=app.api_key).__aenter__()
            )
            await held.get()
            # When a worker serving alpha starts beside it
            async with running_gateway(settings, teams=("alpha", "beta")):
                # Expect the app answered by it (the request sent again), long before its
                # wait for an answer (30 s) ends, and served
                async with asyncio.timeout(10):
                    alpha = await starting
                try:
                    assert (await alpha.chat("gpt-4o-mini", HELLO, timeout=30)).status == "ok"
                    replies = alpha._reply_queue
                finally:
                    await alpha.__aexit__(None, None, None)
                # ... and the held copy, once the consumer holding it is gone and the worker
                # gets it, dropped: run, it would open the closed app's queue again (taking
                # one of the team's slots for 5 minutes)
                with logged("workers.control", "a copy of team alpha's control request") as dropped:
                    await channel.close()
                    async with asyncio.timeout(10):
                        await dropped.wait()
                assert replies is not None and not await exists(settings, replies)
                async with GatewayClient(app.settings, team="alpha", api_key=app.api_key) as again:
                    assert (await again.chat("gpt-4o-mini", HELLO, timeout=30)).status == "ok"


@pytest.mark.parametrize("identity", ["broker", "api_key"])
async def test_a_request_whose_client_stopped_waiting_is_not_carried_out(
    settings: Settings, teams: dict[str, Credentials], identity: str
) -> None:
    results = Topology(settings.namespace).results_queue("alpha", "nightly")
    async with (
        alpha_app(settings, teams, identity) as app,
        running_gateway(settings, teams=("alpha", "beta")),
    ):
        async with GatewayClient(
            app.settings, team="alpha", api_key=app.api_key, reply_queue="nightly"
        ):
            pass
        connection = await aio_pika.connect(app.settings.amqp_url)
        async with connection:
            channel = await connection.channel()
            await (await channel.get_queue(DIRECT_REPLY_TO, ensure=False)).consume(
                ignore, no_ack=True
            )
            exchange = await channel.get_exchange(alpha_entry(settings), ensure=False)
            # When a worker gets alpha's request to delete its named results queue only after
            # its client stopped waiting (sent 40 s ago, 30 s to live: a worker held it,
            # stopped, while the client was told no gateway answered)
            with logged("workers.control", "control requests of team alpha dropped") as dropped:
                await exchange.publish(
                    control_message(
                        CloseReplyQueue(name="nightly", durable=True),
                        team="alpha",
                        reply_to=DIRECT_REPLY_TO,
                        user=app.user,
                        key=app.signs_with,
                        sent=datetime.now(UTC) - timedelta(seconds=40),
                        wait_s=30,
                    ),
                    routing_key="alpha.control",
                )
                async with asyncio.timeout(10):
                    await dropped.wait()
        # Expect it dropped, not carried out: the queue, opened again since, stays
        assert await exists(settings, results)
        # ... while a request still waited for is: the queue deleted
        assert (
            await delete_reply_queue(app.settings, "nightly", team="alpha", api_key=app.api_key)
            is not None
        )
        assert not await exists(settings, results)


@pytest.mark.parametrize("identity", ["broker", "api_key"])
async def test_a_copy_delivered_again_is_answered_and_another_copy_is_dropped(
    settings: Settings,
    teams: dict[str, Credentials],
    identity: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "workers.control")
    request = uuid.uuid4().hex
    async with (
        alpha_app(settings, teams, identity) as app,
        running_gateway(settings, teams=("alpha", "beta")),
    ):
        connection = await aio_pika.connect(app.settings.amqp_url)
        async with connection:
            channel = await connection.channel()
            answers: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
            await (await channel.get_queue(DIRECT_REPLY_TO, ensure=False)).consume(
                answers.put, no_ack=True
            )
            exchange = await channel.get_exchange(alpha_entry(settings), ensure=False)

            def copy() -> aio_pika.Message:
                return control_message(
                    OpenReplyQueue(name="copied"),
                    team="alpha",
                    reply_to=DIRECT_REPLY_TO,
                    user=app.user,
                    key=app.signs_with,
                    copy_of=request,
                )

            # When a copy of alpha's request is delivered, then delivered again (as one whose
            # answer could not be sent comes back)
            first = copy()
            for _ in range(2):
                await exchange.publish(first, routing_key="alpha.control")
                async with asyncio.timeout(10):
                    answer = await answers.get()
                # Expect it answered each time
                assert answer.correlation_id == first.correlation_id
                assert ControlResponse.model_validate_json(answer.body).ok
            # ... and another copy of the same request dropped, unanswered
            with logged("workers.control", "a copy of team alpha's control request") as dropped:
                await exchange.publish(copy(), routing_key="alpha.control")
                async with asyncio.timeout(10):
                    await dropped.wait()
            assert answers.empty()
