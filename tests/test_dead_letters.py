"""Poison jobs and expired jobs end in the dead-letter queue; replay brings them back once."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path

import aio_pika
import orjson
import pytest
import yaml
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from admin.teams import Credentials
from producer import GatewayClient
from producer.client import job_message
from queuegate import dlq
from queuegate.errors import ConfigError
from queuegate.messages import ChatResult
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from queuegate.topology import (
    HEADER_DEAD_DETAIL,
    HEADER_DEAD_QUEUE,
    HEADER_DEAD_REASON,
    Topology,
)
from tests.support import Gateway, dead_letters, depth, dlq_cli, running_gateway, wait_until
from tests.teams import register

HELLO = [{"role": "user", "content": "Hello there"}]


def _death(message: AbstractIncomingMessage) -> dict[str, object]:
    deaths = (message.headers or {})["x-death"]
    assert isinstance(deaths, list)
    death = deaths[0]
    assert isinstance(death, dict)
    return death


async def _publish_job(gw: Gateway, channel: AbstractChannel, job_id: str, reply_to: str) -> None:
    body = {"job_id": job_id, "team": "alpha", "model": "gpt-4o-mini", "messages": HELLO}
    exchange = await channel.get_exchange(gw.topology.jobs_exchange)
    await exchange.publish(
        aio_pika.Message(orjson.dumps(body), message_id=job_id, reply_to=reply_to),
        routing_key="alpha",
    )


async def _refusing_queue(channel: AbstractChannel, name: str) -> None:
    """A reply queue at its quota that refuses every publish (the broker nacks it)."""
    await channel.declare_queue(
        name,
        # Never consumed, so never auto-deleted: it expires by itself after the test.
        arguments={"x-max-length": 0, "x-overflow": "reject-publish", "x-expires": 30_000},
    )


async def test_a_job_that_fails_every_delivery_is_dead_lettered_at_the_limit(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a job whose reply queue refuses every result, so the worker fails it each time
    settings = settings.model_copy(update={"delivery_limit": 2})
    refusing = f"{settings.namespace}.refusing"
    async with running_gateway(settings) as gw:
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            await _refusing_queue(channel, refusing)
            # When it is published
            await _publish_job(gw, channel, "poison-1", refusing)

            # Expect the worker to dead-letter it once its failures pass the limit, saying why
            [dead] = await gw.dead_letters(1)
            assert dead.message_id == "poison-1"
            assert dead.headers[HEADER_DEAD_REASON] == "delivery_limit"
            assert dead.headers[HEADER_DEAD_QUEUE] == gw.topology.team_queue("alpha")
            # ... after its first delivery and `delivery_limit` more
            failures = [r for r in caplog.records if "failed in the worker" in str(r.msg)]
            assert len(failures) == settings.delivery_limit + 1
            # ... the provider called once: redeliveries were answered from the stored outcome
            assert gw.mock.stats.calls == 1
            # ... and the worker still serves good jobs
            async with gw.client("alpha") as client:
                result = await client.chat("gpt-4o-mini", HELLO, timeout=10)
                assert result.status == "ok"


async def test_a_job_whose_reply_queue_is_gone_is_refused_before_any_call(
    settings: Settings,
) -> None:
    async with running_gateway(settings) as gw:
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            # Given a job whose reply queue no longer exists
            channel = await connection.channel(publisher_confirms=True)
            await _publish_job(gw, channel, "caller-gone", f"{settings.namespace}.nobody")
            # Expect it dead-lettered saying why, accounted as refused, the provider not called
            [dead] = await gw.dead_letters(1)
            assert dead.message_id == "caller-gone"
            assert dead.headers[HEADER_DEAD_REASON] == "invalid_request"
            assert "does not exist" in str(dead.headers[HEADER_DEAD_DETAIL])
            [row] = await gw.usage_rows(1)
            assert row["job_id"].startswith("caller-gone/refused/")
            assert row["error_code"] == "invalid_request" and not row["reply_delivered"]
            assert gw.mock.stats.calls == 0


async def test_replay_answers_a_dead_letter_once_and_counts_it_once(settings: Settings) -> None:
    # Given a poison job dead-lettered because its reply queue refused every result
    settings = settings.model_copy(update={"delivery_limit": 1})
    refusing = f"{settings.namespace}.refusing"
    async with running_gateway(settings) as gw:
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            await _refusing_queue(channel, refusing)
            await _publish_job(gw, channel, "poison-2", refusing)
            await wait_until(lambda: gw.mock.stats.calls == 1)
            letters: list[dlq.DeadLetter] = []
            async with asyncio.timeout(10):
                while not letters:  # the broker announces no dead-lettering: look again
                    letters, total = await dlq.peek(settings)
            assert total == 1 and letters[0].reason == "delivery_limit"

            # When the reply queue is fixed and the dead letter replayed
            await channel.queue_delete(refusing)
            replies = await channel.declare_queue(refusing, auto_delete=True)
            replayed, refused = await dlq.replay(settings, {"poison-2"})

            # Expect the result delivered, from the stored outcome (no second provider call)
            assert [x.message_id for x in replayed] == ["poison-2"] and not refused
            async with asyncio.timeout(10), replies.iterator() as messages:
                async for message in messages:
                    result = ChatResult.model_validate_json(message.body)
                    break
            assert result.job_id == "poison-2" and result.status == "ok"
            assert gw.mock.stats.calls == 1
            # ... exactly one usage row, and the dead-letter queue empty
            [row] = await gw.usage_rows(1)
            assert row["job_id"] == "poison-2"
            assert (await dlq.peek(settings))[1] == 0


async def test_a_job_past_its_deadline_is_answered_without_a_provider_call(
    settings: Settings,
) -> None:
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        # Given a job whose deadline passed while it waited (published without a TTL)
        job = client.job("gpt-4o-mini", HELLO, deadline=datetime.now(UTC) - timedelta(seconds=1))
        await gw.publish(
            job.model_dump_json().encode(), message_id=job.job_id, reply_to=client.reply_to
        )
        # When the worker takes it, expect deadline_exceeded, no call, and a usage row
        result = await client.wait(job.job_id, timeout=10)
        assert result.error is not None and result.error.code == "deadline_exceeded"
        [row] = await gw.usage_rows(1)
        assert row["error_code"] == "deadline_exceeded"
        assert gw.mock.stats.calls == 0


async def test_an_expired_job_is_dead_lettered_by_the_broker_when_no_worker_runs(
    settings: Settings,
) -> None:
    # Given a registered team and no worker serving its jobs (one serving another team
    # answers the client's control request)
    await register(settings, "alpha", TeamConfig())
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection, running_gateway(settings, teams=("gamma",)):
        channel = await connection.channel()
        await Topology(settings.namespace).declare_team_queue(channel, "alpha")
        async with GatewayClient(settings, team="alpha") as client:
            # When a job with a 100 ms deadline is submitted
            job = client.job("gpt-4o-mini", HELLO, deadline=timedelta(milliseconds=100))
            await client.submit(job)
        # Expect the broker itself to dead-letter it as expired, among alpha's dead letters
        dead_queue = await channel.get_queue(Topology(settings.namespace).team_dead_queue("alpha"))
        async with asyncio.timeout(10), dead_queue.iterator() as messages:
            async for message in messages:
                await message.ack()
                break
        assert message.message_id == job.job_id
        assert _death(message)["reason"] == "expired"


async def test_dlq_cli_lists_shows_and_purges(settings: Settings) -> None:
    # Given one dead-lettered job (bad input, dead-lettered by the worker) with a long id, of
    # alpha's, and beta served with none
    job_id = "bad-" + "0123456789abcdef" * 2
    async with (
        running_gateway(settings, teams=("alpha", "beta")) as gw,
        gw.client("alpha") as client,
    ):
        body = {"job_id": job_id, "team": "alpha", "model": "no-such-model", "messages": HELLO}
        await gw.publish(orjson.dumps(body), message_id=job_id, reply_to=client.reply_to)
        await client.wait(job_id, timeout=10)

    async def cli(*args: str) -> str:
        return (await dlq_cli(settings, *args))[0]

    # When an operator lists at 80 columns, expect the whole id (to copy), the reason, the team
    listing = await cli("list")
    assert all(len(line) <= 80 for line in listing.splitlines()), listing
    [row] = [line for line in listing.splitlines() if job_id in line]
    assert "unknown_model" in row and "alpha" in row
    # ... the filters keeping it or leaving it out, and every field as JSON
    assert job_id in await cli("list", "--team", "alpha", "--reason", "unknown_model")
    assert job_id not in await cli("list", "--team", "beta")
    assert job_id not in await cli("list", "--reason", "expired")
    [entry] = [orjson.loads(line) for line in (await cli("list", "--json")).splitlines()]
    assert entry["job_id"] == job_id and entry["team"] == "alpha" and entry["deaths"] == 1
    # ... shown by a prefix of its id, with one death however often it was listed
    shown = await cli("show", job_id[:8])
    assert "no-such-model" in shown and "x-queuegate-reason" in shown
    assert "deaths: 1 " in shown and "x-delivery-count" not in shown
    assert "purged 1 dead letters" in await cli("purge", "--yes")
    assert (await dlq.peek(settings))[1] == 0


async def test_dlq_show_names_an_unknown_or_ambiguous_prefix_in_one_line(
    settings: Settings,
) -> None:
    letters = [
        dlq.DeadLetter(
            position=i,
            message_id=job_id,
            reason="expired",
            detail="",
            then=None,
            queue=f"{settings.namespace}.jobs.alpha",
            team="alpha",
            deaths=1,
            at=None,
            headers={},
            body=b"{}",
            reply_to=None,
            user_id=None,
            truncated=None,
        )
        for i, job_id in enumerate(["abc-1", "abc-2"], start=1)
    ]
    assert dlq.find(letters, "abc-2").message_id == "abc-2"
    with pytest.raises(ConfigError, match="2 dead letters have ids starting with 'abc'"):
        dlq.find(letters, "abc")
    with pytest.raises(ConfigError, match="no dead letter with id 'xyz'"):
        dlq.find(letters, "xyz")


COPIES = 10


async def test_copies_of_a_refused_job_whose_reply_queue_went_are_each_refused_once(
    settings: Settings, teams: dict[str, Credentials]
) -> None:
    alpha = teams["alpha"]
    assert alpha.amqp_url is not None and alpha.user is not None
    apps = settings.model_copy(update={"amqp_url": alpha.amqp_url})
    async with running_gateway(settings, teams=("alpha",)) as gw:
        # Given alpha's client, which the worker has answered, closes: its reply queue is gone
        async with GatewayClient(apps, team="alpha") as client:
            served = await client.chat("gpt-4o-mini", HELLO, timeout=10)
            assert served.status == "ok", served.error
            reply_to = client.reply_to
            job = client.job("gpt-4o-mini", HELLO).model_copy(update={"team": "beta"})
        # When alpha's app publishes copies of a job the worker refuses (another team's job on
        # alpha's queue), each answered to that queue: returned, as it no longer exists
        connection = await aio_pika.connect(alpha.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(gw.topology.entry_exchange("alpha"), ensure=False)
            message = job_message(job, reply_to=reply_to, user_id=alpha.user)
            await asyncio.gather(
                *(exchange.publish(message, routing_key="alpha") for _ in range(COPIES))
            )
        # Expect each copy dead-lettered once, and the refused request accounted once however
        # many copies of it came (its row's id is the request's: a copy is as a redelivery),
        # beside the served job's row
        letters = await gw.dead_letters(COPIES)
        assert {letter.message_id for letter in letters} == {job.job_id}
        assert len(letters) == COPIES
        rows = await gw.usage_rows(2)
    # ... and none taken back to be refused and counted again
    assert len(rows) == 2
    assert await depth(settings, gw.topology.team_queue("alpha")) == 0
    assert await depth(settings, gw.topology.team_dead_queue("alpha")) == 0


async def _ack(message: AbstractIncomingMessage) -> None:
    await message.ack()


async def test_a_team_queue_an_earlier_version_declared_is_used_as_it_is(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    topology = Topology(settings.namespace)
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        # Given a team queue declared as earlier versions did: the poison limit as its argument
        channel = await connection.channel()
        await channel.declare_queue(
            topology.team_queue("alpha"),
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-delivery-limit": 5,
                "x-dead-letter-exchange": topology.dead_exchange,
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            },
        )
        # When this version declares it on a channel that already consumes from another queue
        other = await channel.declare_queue(exclusive=True)
        await other.consume(_ack)
        queue = await topology.declare_team_queue(channel, "alpha")

        # Expect it used as it is (bound, the channel open), with a warning naming it
        confirmed = await connection.channel(publisher_confirms=True)
        exchange = await confirmed.get_exchange(topology.jobs_exchange)
        await exchange.publish(aio_pika.Message(b"{}"), routing_key="alpha")
        message = await queue.get(timeout=10)
        await message.ack()
        assert not channel.is_closed
        assert any(
            topology.team_queue("alpha") in r.getMessage() and "earlier version" in r.getMessage()
            for r in caplog.records
        )


def _catalog_with(tmp_path: Path, alias: str) -> Path:
    """The bundled catalog with ``alias`` added, served as gpt-4o-mini is: an operator's fix."""
    catalog = yaml.safe_load(resources.files("router").joinpath("catalogs/mock.yaml").read_text())
    served = catalog["models"]["gpt-4o-mini"]["deployments"]
    renamed = [{**x, "name": f"{alias}-{x['name']}"} for x in served]  # names are unique
    catalog["models"][alias] = {"deployments": renamed}
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(catalog))
    return path


async def test_a_job_answered_unknown_model_is_not_replayed_once_the_alias_exists(
    settings: Settings, tmp_path: Path
) -> None:
    # Given a job naming an alias the catalog lacks: answered unknown_model, dead-lettered
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        answered = await client.chat("fixme", HELLO, timeout=10)
        assert answered.error is not None and answered.error.code == "unknown_model"
        [letter] = await dead_letters(settings, 1)
        assert letter.answered == "unknown_model"
        # When the operator adds the alias, restarts the worker and replays the letter
        await gw.stop_worker()
        async with running_gateway(settings, catalog=_catalog_with(tmp_path, "fixme")) as fixed:
            job_id = answered.job_id
            stdout, stderr = await dlq_cli(settings, "replay", job_id, exit_code=1)
            # Expect to be told, in one line, that it was answered and what serves it
            assert "replayed 0 dead letters" in stdout
            assert stderr.splitlines() == [
                f"not replayed {job_id}: answered unknown_model when it died, and a replay "
                "would send that answer again: have its caller submit the request anew (a new "
                "job id) to be served"
            ]
            # ... the letter still a dead letter, `show` saying why, its row unchanged
            assert [x.message_id for x in (await dlq.peek(settings))[0]] == [job_id]
            assert "not replayable: answered unknown_model" in (
                await dlq_cli(settings, "show", job_id)
            )[0].replace("\n", " ")
            # ... and its request, sent anew by its caller, served and billed once under its id
            again = await client.chat("fixme", HELLO, timeout=10)
            assert again.status == "ok" and again.job_id != job_id
            rows = await fixed.usage_rows(2)
            assert {r["job_id"]: r["error_code"] for r in rows} == {
                job_id: "unknown_model",
                again.job_id: None,
            }
            assert fixed.mock.stats.calls == 1


async def test_replay_serves_a_job_that_died_unanswered_and_keeps_one_answered_since(
    settings: Settings, tmp_path: Path, direct: AbstractChannel
) -> None:
    # Given two of alpha's jobs that expired in its queue while no worker served alpha (one
    # serving gamma answers the client's request for a reply queue), one naming `fixme`
    await register(settings, "alpha", TeamConfig())
    await Topology(settings.namespace).declare_team_queue(direct, "alpha")
    async with (
        running_gateway(settings, teams=("gamma",)) as gw,
        gw.client("alpha") as client,
    ):
        late, typo = client.job("gpt-4o-mini", HELLO), client.job("fixme", HELLO)
        for job in (late, typo):
            await gw.publish(
                job.model_dump_json().encode(),
                message_id=job.job_id,
                reply_to=client.reply_to,
                expiration=timedelta(milliseconds=1),
            )
        await dead_letters(settings, 2)
        # ... `fixme` replayed before the catalog had it: answered unknown_model, dead again
        async with running_gateway(settings) as alpha:
            assert [x.message_id for x in (await dlq.replay(settings, {typo.job_id}))[0]] == [
                typo.job_id
            ]
            refusal = await client.wait(typo.job_id, timeout=10)
            assert refusal.error is not None and refusal.error.code == "unknown_model"
            await dead_letters(settings, 2)
        # When the operator adds the alias, restarts the worker and replays every letter
        async with running_gateway(settings, catalog=_catalog_with(tmp_path, "fixme")) as alpha:
            replayed, refused = await dlq.replay(settings)
            # Expect the job that died unanswered replayed, served once and billed once
            assert [x.message_id for x in replayed] == [late.job_id]
            served = await client.wait(late.job_id, timeout=10)
            assert served.status == "ok", served.error
            rows = await alpha.usage_rows(2)
            assert {r["job_id"]: r["error_code"] for r in rows} == {
                late.job_id: None,
                typo.job_id: "unknown_model",
            }
            assert alpha.mock.stats.calls == 1
            # ... and the one answered as it last died kept, first cause and answer both told
            [(kept, why)] = refused
            assert kept.message_id == typo.job_id and kept.reason == "expired"
            assert kept.answered == "unknown_model"
            assert why.startswith("answered unknown_model when it died")
            assert [x.message_id for x in (await dlq.peek(settings))[0]] == [typo.job_id]
