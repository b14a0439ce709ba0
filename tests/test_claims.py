"""Job claims: a job is called once however often it is delivered, a reused id is refused,
and a job nobody could read or receive costs nothing."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, get_args

import aio_pika
import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from pydantic import BaseModel

from accounting.store import insert_usage
from admin.teams import Credentials, add, set_security
from mockprovider import Behavior, MockConfig
from producer import GatewayClient
from queuegate import dlq
from queuegate.errors import (
    AnswerTaken,
    ClientError,
    DeadlineExceeded,
    GaveUp,
    IdempotencyConflict,
    JobIdInFlight,
)
from queuegate.keys import Keys
from queuegate.management import BrokerAdmin
from queuegate.messages import Attempt, ChatJob, ChatResult
from queuegate.redis_client import lua_source
from queuegate.registry import TeamConfig
from queuegate.script_calls import TurnScript
from queuegate.settings import Settings
from queuegate.spend import current_month, ledger_spent, ledgers_in_force, to_nano
from queuegate.topology import HEADER_DEAD_DETAIL, HEADER_DEAD_REASON
from router import health, load_catalog
from router.router import Routed
from tests.support import Gateway, running_accountant, running_gateway, wait_until
from tests.teams import register
from tests.test_script_calls import connections_named, named_client
from workers.admission.budgets import Budgets
from workers.admission.estimate import estimate
from workers.admission.scripts import Call, Scripts
from workers.claims import (
    Busy,
    Claim,
    ClaimedJob,
    Claims,
    Duplicate,
    Lapsed,
    LostCall,
    planned_call,
)
from workers.outcome import Announcement, Outcome, Timing, as_json, failed, unwritable
from workers.outcome import served as served_outcome
from workers.usage_record import UsageRecord

HELLO = [{"role": "user", "content": "Hello there"}]
SLOW = MockConfig(default=Behavior(latency_ms=300))
"""Calls slow enough for the deliveries of one job to overlap."""


@pytest.fixture
async def broker_team(settings: Settings) -> AsyncIterator[Credentials]:
    """Team alpha added the default way: its own broker user, proven by ``user_id``."""
    credentials = await add(settings, "alpha")
    try:
        yield credentials
    finally:
        async with BrokerAdmin.of(settings) as admin:
            if credentials.user:
                await admin.delete_user(credentials.user)


@pytest.fixture
def broker_settings(settings: Settings, broker_team: Credentials) -> Settings:
    """The settings of ``broker_team``'s own client: its broker user's URL."""
    assert broker_team.amqp_url is not None
    return settings.model_copy(update={"amqp_url": broker_team.amqp_url})


@pytest.fixture
async def alpha_gateway(
    settings: Settings, broker_settings: Settings
) -> AsyncIterator[tuple[Gateway, GatewayClient]]:
    """A gateway, and the client of ``broker_team`` (added the default way) on it."""
    async with (
        running_gateway(settings) as gw,
        GatewayClient(broker_settings, team="alpha") as client,
    ):
        yield gw, client


async def _queue_is_empty(gw: Gateway) -> bool:
    connection = await aio_pika.connect(gw.settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(gw.topology.team_queue("alpha"), passive=True)
        return queue.declaration_result.message_count == 0


async def test_a_job_published_twice_at_once_is_called_once(
    settings: Settings, broker_team: Credentials, broker_settings: Settings
) -> None:
    # Given a slow provider and team alpha connected as its own broker user
    async with (
        running_gateway(settings, mock_config=SLOW) as gw,
        GatewayClient(broker_settings, team="alpha") as client,
    ):
        # When each of 20 jobs is published twice at once (a producer's resend)
        jobs = [
            client.job("gpt-4o-mini", [{"role": "user", "content": f"job {i}"}]) for i in range(20)
        ]
        handles = await asyncio.gather(*(client.submit(job) for job in jobs + jobs))
        results = await asyncio.gather(*(h.result(timeout=30) for h in handles[:20]))

        # Expect one provider call per job, every job answered ok, both deliveries answered
        # with the same result and acknowledged, and one usage row per job
        assert all(r.status == "ok" for r in results)
        await wait_until(lambda: client.duplicates == 20, timeout=30)
        again = [await h.result(timeout=10) for h in handles[20:]]
        assert [r.response for r in again] == [r.response for r in results]
        assert gw.mock.stats.calls == 20
        await wait_until(lambda: gw.worker.in_flight == 0)
        assert await _queue_is_empty(gw)
        rows = await gw.usage_rows(20)
        assert len(rows) == 20 and all(r["identity"] == f"broker:{broker_team.user}" for r in rows)


async def test_a_duplicate_held_past_the_wait_goes_back_to_its_queue_uncalled(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a call long enough for a duplicate to wait for it past its wait about 7 times, and
    # a delivery limit of 2 failures
    settings = settings.model_copy(update={"claim_wait": 0.2, "delivery_limit": 2})
    slow = MockConfig(default=Behavior(latency_ms=1500))
    caplog.set_level(logging.INFO, logger="workers.processor")
    async with running_gateway(settings, mock_config=slow) as gw, gw.client("alpha") as client:
        # When one job is published twice at once
        job = client.job("gpt-4o-mini", HELLO)
        handles = await asyncio.gather(client.submit(job), client.submit(job))
        result = await handles[0].result(timeout=30)

        # Expect the duplicate returned to its queue while the first was held, never called,
        # and answered from the first's outcome once it came back, not dead-lettered as past
        # its delivery limit: its returns while the first held the job are no failures
        assert result.status == "ok"
        await wait_until(lambda: client.duplicates == 1, timeout=30)
        assert any("past the wait" in r.getMessage() for r in caplog.records)
        assert gw.mock.stats.calls == 1
        assert len(await gw.usage_rows(1)) == 1
        assert (await dlq.peek(settings))[1] == 0


async def test_a_reused_job_id_with_a_different_request_is_refused_as_a_conflict(
    settings: Settings, broker_team: Credentials
) -> None:
    # Given team alpha proving itself with an API key, and a job it had answered
    _, credentials = await set_security(settings, "alpha", identity="api_key")
    assert credentials is not None and credentials.api_key is not None
    async with (
        running_gateway(settings) as gw,
        gw.client("alpha", api_key=credentials.api_key) as first,
        gw.client("alpha", api_key=credentials.api_key) as second,
        gw.client("alpha", api_key=credentials.api_key) as third,
    ):
        answered = await (await first.submit(first.job("gpt-4o-mini", HELLO, job_id="x-1"))).result(
            10
        )
        assert answered.status == "ok"

        # When another request is sent under the same job id
        other = second.job(
            "gpt-4o-mini", [{"role": "user", "content": "Another prompt"}], job_id="x-1"
        )
        result = await (await second.submit(other)).result(10)

        # Expect a conflict, never the first prompt's answer, and no second call
        assert result.status == "error" and result.response is None
        assert result.error is not None and result.error.code == "idempotency_conflict"
        assert gw.mock.stats.calls == 1
        [dead] = await gw.dead_letters(1)
        assert dead.headers[HEADER_DEAD_REASON] == "idempotency_conflict"
        # ... while the same request again is answered with the stored result
        again = await (await third.submit(first.job("gpt-4o-mini", HELLO, job_id="x-1"))).result(10)
        assert again.status == "ok" and again.response == answered.response
        assert gw.mock.stats.calls == 1


async def test_each_handle_of_a_client_gets_the_answer_to_its_own_request(
    settings: Settings,
) -> None:
    # Given one client, and a job in flight on it (the provider takes 300 ms)
    async with running_gateway(settings, mock_config=SLOW) as gw, gw.client("alpha") as client:
        first = await client.submit(client.job("gpt-4o-mini", HELLO, job_id="x-3"))

        # When a different request is submitted under its id, and the same request again
        other = client.job("gpt-4o-mini", [{"role": "user", "content": "Other"}], job_id="x-3")
        with pytest.raises(JobIdInFlight, match="'x-3' is in flight on this client"):
            await client.submit(other)
        same = await client.submit(client.job("gpt-4o-mini", HELLO, job_id="x-3"))

        # Expect the first handle answered with its own result, once called, shared by the
        # same request: the different one was never published, so never answered under x-3
        answered = await first.result(10)
        assert answered.status == "ok", answered.error
        again = await same.result(10)
        assert again.status == "ok" and again.response == answered.response
        assert gw.mock.stats.calls == 1


async def test_each_handle_of_a_job_submitted_twice_gets_its_answer_however_late_it_asks(
    alpha_gateway: tuple[Gateway, GatewayClient],
) -> None:
    # Given a team added the default way, whose client submits the same job twice
    gw, client = alpha_gateway
    job = client.job("gpt-4o-mini", HELLO, job_id="x-twice")
    first, second = [await client.submit(job) for _ in range(2)]

    # When both answers are in (the second, from the stored outcome) before either
    # handle asks for its result
    await wait_until(lambda: client.duplicates == 1)
    answers = [await handle.result(10) for handle in (first, second, first, second)]

    # Expect each handle answered, with the one call's answer, and again when awaited again
    assert [a.status for a in answers] == ["ok"] * 4
    assert all(a.response == answers[0].response for a in answers)
    assert gw.mock.stats.calls == 1


async def test_a_wait_for_an_answer_taken_already_says_so_at_once(
    alpha_gateway: tuple[Gateway, GatewayClient],
) -> None:
    # Given a team added the default way, whose client took a job's answer through its handle
    gw, client = alpha_gateway
    job = client.job("gpt-4o-mini", HELLO, job_id="x-taken")
    answered = await (await client.submit(job)).result(10)

    # When it waits for the job by id (before: it waited out its whole timeout)
    with pytest.raises(AnswerTaken, match="job x-taken was taken already on this client"):
        await asyncio.wait_for(client.wait("x-taken", timeout=600), 10)

    # Expect the job submitted again answered again, from its stored outcome
    again = await (await client.submit(job)).result(10)
    assert again.status == answered.status == "ok"
    assert again.response == answered.response
    assert gw.mock.stats.calls == 1


async def test_a_handle_gets_its_answer_whatever_took_it_first_and_lets_it_go_dropped(
    alpha_gateway: tuple[Gateway, GatewayClient],
) -> None:
    gw, client = alpha_gateway
    # Given a job submitted, its answer taken by a wait by id first
    job = client.job("gpt-4o-mini", HELLO, job_id="x-first")
    handle = await client.submit(job)
    by_id = await client.wait(job.job_id, 10)
    # Expect its handle answered all the same (before: AnswerTaken), then the job let go
    assert (await handle.result(10)).response == by_id.response
    with pytest.raises(AnswerTaken):
        await client.wait(job.job_id, 10)

    # Given another, streamed, and the same request submitted while it streams
    streamed = client.job("gpt-4o-mini", HELLO, job_id="x-streamed")
    stream = client.stream("gpt-4o-mini", HELLO, job_id="x-streamed")
    first = await anext(stream)
    same = await client.submit(streamed)
    read = [first, *[chunk async for chunk in stream]]
    # Expect the handle answered once the stream took the answer (before: AnswerTaken)
    assert read and stream.result is not None
    assert (await same.result(10)).response == stream.result.response

    # When a handle is dropped unawaited, expect its job's answer let go with it: a wait by
    # id takes it, and the client keeps it no longer
    job = client.job("gpt-4o-mini", HELLO, job_id="x-dropped")
    await client.submit(job)
    assert (await client.wait(job.job_id, 10)).status == "ok"
    with pytest.raises(AnswerTaken):
        await client.wait(job.job_id, 10)
    # ... and when nobody waits for it, expect the answer dropped as it comes (before: kept
    # for the client's whole life, one a job)
    kept = client.duplicates + client.strays
    for n in range(20):
        await client.submit(client.job("gpt-4o-mini", HELLO, job_id=f"x-gone-{n}"))
    await wait_until(lambda: gw.mock.stats.calls == 23)
    await wait_until(lambda: all(f"x-gone-{n}" in client._inbox.replies._seen for n in range(20)))
    for n in range(20):
        with pytest.raises(AnswerTaken):
            await client.wait(f"x-gone-{n}", 10)
    assert client.duplicates + client.strays == kept


async def test_a_client_closed_ends_its_waits_and_refuses_more_at_once(
    settings: Settings, broker_settings: Settings
) -> None:
    # Given a team added the default way, its client awaiting a job held 300 ms at the
    # provider, by its handle and by id without a timeout
    async with running_gateway(settings, mock_config=SLOW):
        async with GatewayClient(broker_settings, team="alpha") as client:
            handle = await client.submit(client.job("gpt-4o-mini", HELLO, job_id="x-closed"))
            waits = [
                asyncio.ensure_future(handle.result(600)),
                asyncio.ensure_future(client.wait("x-closed", timeout=None)),
            ]
            await asyncio.sleep(0)
        # When the client closes, expect each wait ended at once (before: each waited out
        # its timeout, the one without for ever)
        done, _ = await asyncio.wait(waits, timeout=10)
        assert done == set(waits)
        assert all(isinstance(wait.exception(), GaveUp) for wait in waits)
        # ... and a wait or a submit on it refused at once (before: 60 s, then "lost the
        # RabbitMQ connection")
        with pytest.raises(ClientError, match="this client reads no results"):
            await client.wait("x-closed", 10)
        with pytest.raises(RuntimeError, match="inside `async with`"):
            await client.submit(client.job("gpt-4o-mini", HELLO))


async def test_a_named_queue_keeps_no_other_requests_answer_for_a_job_id(
    settings: Settings,
) -> None:
    # Given a pipeline's named queue, and the answer to a job x-4 of an earlier run of the
    # pipeline waiting in it (the run stopped before reading it)
    async with running_gateway(settings) as gw:
        async with gw.client("alpha", reply_queue="nightly") as earlier:
            nightly = earlier.reply_to
        async with gw.client("alpha", listen=False) as publisher:
            await publisher.publish(
                publisher.job("gpt-4o-mini", HELLO, job_id="x-4"), reply_to=nightly
            )
        [row] = await gw.usage_rows(1)  # accounted once its result is in the queue
        assert row["status"] == "ok"

        # When the next run submits a different request under x-4
        async with gw.client("alpha", reply_queue="nightly") as pipeline:
            other = pipeline.job(
                "gpt-4o-mini", [{"role": "user", "content": "Other"}], job_id="x-4"
            )
            result = await (await pipeline.submit(other)).result(10)

            # Expect it answered as a conflict, never with the earlier request's answer
            assert result.status == "error" and result.response is None
            assert result.error is not None and result.error.code == "idempotency_conflict"
            assert pipeline.strays == 1
        assert gw.mock.stats.calls == 1


async def test_a_refused_job_delivered_again_is_accounted_once(settings: Settings) -> None:
    # Given a job answered under an id, and no accounting running yet
    async with (
        running_gateway(settings, accounting=False) as gw,
        gw.client("alpha") as client,
    ):
        answered = await client.chat("gpt-4o-mini", HELLO, job_id="x-2")
        assert answered.status == "ok"

        # When a different request under that id reaches a worker twice (the same message,
        # as after a worker killed before its ack), and a third request under it once
        conflicting = client.job(
            "gpt-4o-mini", [{"role": "user", "content": "Other"}], job_id="x-2"
        )
        third = client.job("gpt-4o-mini", [{"role": "user", "content": "Third"}], job_id="x-2")
        for job in (conflicting, conflicting, third):
            await client.publish(job, reply_to=client.reply_to)
        # (each refusal's usage event is confirmed before its job is dead-lettered)
        await gw.dead_letters(3)
        async with running_accountant(settings) as accountant:
            async with asyncio.timeout(10):
                await accountant.wait_until(lambda: accountant.events_written >= 4)

        # Expect one row per refused request: the repeat collapses, the third has its own
        rows = await gw.pool.fetch(
            "SELECT job_id, error_code FROM usage_log WHERE job_id LIKE 'x-2/refused/%'"
        )
        assert len(rows) == 2
        assert {row["error_code"] for row in rows} == {"idempotency_conflict"}
        assert gw.mock.stats.calls == 1


async def test_a_job_sent_under_a_refusals_id_is_refused_not_served_unbilled(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # (Redis long-lived, as in service: no job is looked up in usage_log before its call)
    await redis_client.set(Keys(settings.redis_prefix).memory_epoch, "0")
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        # Given a refused request (a reused id), whose row's id its sender can work out
        answered = await client.chat("gpt-4o-mini", HELLO, job_id="x-3")
        assert answered.status == "ok"
        other = client.job("gpt-4o-mini", [{"role": "user", "content": "Other"}], job_id="x-3")
        await client.publish(other, reply_to=client.reply_to)
        await gw.dead_letters(1)
        await gw.usage_rows(2)
        refusal = await gw.pool.fetchval("SELECT job_id FROM usage_log WHERE cost_usd = 0")
        assert refusal is not None and refusal.startswith("x-3/refused/")

        # When a real request is sent under that id (its row would collide with the
        # refusal's of no cost, and the call go unbilled)
        job = {"job_id": refusal, "team": "alpha", "model": "gpt-4o-mini", "messages": HELLO}
        await gw.publish(
            orjson.dumps(job), message_id=refusal, correlation_id=refusal, reply_to=client.reply_to
        )

        # Expect it refused as bad input, never called; the client refuses to build it
        result = await client.wait(refusal, timeout=10)
        assert result.error is not None and result.error.code == "invalid_request"
        assert "/refused/" in result.error.message
        assert gw.mock.stats.calls == 1
        with pytest.raises(ValueError, match="may not contain '/refused/'"):
            client.job("gpt-4o-mini", HELLO, job_id=refusal)


@pytest.mark.parametrize(
    ("case", "body", "content_type", "detail"),
    [
        ("newer-schema", {"v": 99}, "application/json", "schema version 99"),
        ("plain-text", {}, "text/plain", "content_type 'text/plain'"),
    ],
)
async def test_a_job_the_worker_cannot_read_is_refused_before_any_call(
    settings: Settings, case: str, body: dict[str, object], content_type: str, detail: str
) -> None:
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        # Given a job of a schema version newer than the worker's, or one that is not JSON
        job = {"job_id": case, "team": "alpha", "model": "gpt-4o-mini", "messages": HELLO, **body}
        await gw.publish(
            orjson.dumps(job),
            message_id=case,
            correlation_id=case,
            reply_to=client.reply_to,
            content_type=content_type,
        )
        # Expect it answered invalid_request, dead-lettered saying why, and never called
        result = await client.wait(case, timeout=10)
        assert result.error is not None and result.error.code == "invalid_request"
        [dead] = await gw.dead_letters(1)
        assert dead.headers[HEADER_DEAD_REASON] == "invalid_request"
        assert detail in str(dead.headers[HEADER_DEAD_DETAIL])
        assert gw.mock.stats.calls == 0


async def test_a_job_without_reply_to_is_refused_before_any_call(settings: Settings) -> None:
    async with running_gateway(settings) as gw:
        # Given a job that names no reply queue
        job = {"job_id": "nowhere", "team": "alpha", "model": "gpt-4o-mini", "messages": HELLO}
        await gw.publish(orjson.dumps(job), message_id="nowhere")
        # Expect it dead-lettered saying why, accounted as refused, and never called
        [dead] = await gw.dead_letters(1)
        assert dead.headers[HEADER_DEAD_REASON] == "invalid_request"
        assert "no reply_to" in str(dead.headers[HEADER_DEAD_DETAIL])
        [row] = await gw.usage_rows(1)
        assert row["job_id"].startswith("nowhere/refused/")
        assert gw.mock.stats.calls == 0


async def test_a_claim_sent_again_by_its_own_delivery_is_still_its_own(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # The Redis client re-sends a command whose connection broke, though the script may have
    # run: the delivery that claimed must not find itself "busy" and wait out its own lease.
    claim = redis_client.register_script(lua_source("workers", "claim"))
    keys = Keys(settings.redis_prefix)
    names = [keys.claim("alpha", "j1"), keys.result("alpha", "j1")]
    names += [keys.memory_epoch, keys.replication, keys.failures("alpha", "j1")]
    fingerprint = "f" * 64
    first = await claim(keys=names, args=["worker/a", 10_000, fingerprint, 60, 5])
    again = await claim(keys=names, args=["worker/a", 10_000, fingerprint, 60, 5])
    other = await claim(keys=names, args=["worker/b", 10_000, fingerprint, 60, 5])
    assert first[0] == again[0] == b"claimed"
    assert other[0] == b"busy" and other[1] == b"worker/a"


async def test_an_outcome_stored_again_by_its_own_delivery_is_still_its_own(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # The Redis client re-sends a store whose connection broke after it ran: the delivery
    # must announce its own outcome, not find it "stored first by another delivery", and its
    # cost counts once in the team's live spend.
    finish = redis_client.register_script(lua_source("workers", "finish"))
    keys = Keys(settings.redis_prefix)
    spend = keys.live_spend("alpha", "2026-12")
    names = [keys.claim("alpha", "j1"), keys.result("alpha", "j1"), keys.lapsing, spend]
    first = await finish(keys=names, args=["f" * 64 + '{"a": 1}', 60, "", 7, 60])
    again = await finish(keys=names, args=["f" * 64 + '{"a": 1}', 60, "", 7, 60])
    other = await finish(keys=names, args=["f" * 64 + '{"a": 2}', 60, "", 5, 60])
    assert first is None and again is None
    assert other == b"f" * 64 + b'{"a": 1}'
    assert await redis_client.get(spend) == b"7"


async def test_jobs_claimed_at_once_share_one_round_trip(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    # Given a worker's claims on a client whose connections carry a name of their own
    client, name = named_client(settings)
    claims = _claims(settings, client, pool, "w")
    jobs = [
        ChatJob(job_id=f"j{i}", team="alpha", model="gpt-4o-mini", messages=HELLO)
        for i in range(20)
    ]
    try:
        # When 20 jobs delivered together are claimed, recorded and stored
        taken = await asyncio.gather(*(claims.take(job, redelivered=False) for job in jobs))
        held = [claim for claim in taken if isinstance(claim, Claim)]
        call = LostCall(model="gpt-4o-mini", deployment="d", provider="p", cost_usd=Decimal(1))
        await asyncio.gather(*(claim.record(call) for claim in held))
        await asyncio.gather(*(claim.finish(_expired(claim.job)) for claim in held))
        # Expect every job claimed, over one connection (a connection each, before: a
        # write, a read and a wake-up each)
        assert len(held) == 20
        assert await connections_named(client, name) == 1
    finally:
        await client.aclose()


def claim_round_trips(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The claim's scripts (``claim``, ``hold``, ``finish``) of every round trip from now on,
    one list a round trip, as they go alone or together (``Scripts.run_all``)."""
    names = {
        hashlib.sha1(lua_source("workers", name).encode()).hexdigest(): name
        for name in ("claim", "hold", "finish")
    }
    trips: list[list[str]] = []
    run_all, call = Scripts.run_all, TurnScript.__call__

    async def together(self: Scripts, calls: Sequence[Call], **options: Any) -> list[Any]:
        trips.append([c.script for c in calls])
        return await run_all(self, calls, **options)

    def alone(
        self: TurnScript,
        keys: Sequence[Any] = (),
        args: Sequence[Any] = (),
        client: aioredis.Redis | None = None,
    ) -> Any:
        if client is None and self.script.sha in names:
            trips.append([names[self.script.sha]])
        return call(self, keys, args, client)

    monkeypatch.setattr(Scripts, "run_all", together)
    monkeypatch.setattr(TurnScript, "__call__", alone)
    return trips


async def test_a_job_one_at_a_time_records_its_call_in_its_claims_round_trip(
    settings: Settings, redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a team without limits, on a model whose first alias has one deployment without
    # limits (the bundled catalog's gpt-4o-mini), whose closed circuit is trusted throughout
    monkeypatch.setattr(health, "TRUST_CLOSED", 600.0)
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        assert (await client.chat("gpt-4o-mini", HELLO, timeout=10)).status == "ok"
        trips = claim_round_trips(monkeypatch)
        # When three jobs are served one at a time
        for _ in range(3):
            result = await client.chat("gpt-4o-mini", HELLO, timeout=10)
            assert result.status == "ok"
        assert gw.mock.stats.calls == 4

    # Expect two round trips of the claim's scripts a job, not three: the claim with the
    # record of the call about to leave, then the outcome's store; and no replies of theirs
    # kept in Redis (each is its delivery's own again if run twice)
    assert trips == [["claim", "hold"], ["finish"]] * 3
    assert await redis_client.keys(Keys(settings.redis_prefix).once("*")) == []


J1 = ChatJob(job_id="j1", team="alpha", model="gpt-4o-mini", messages=HELLO)
CALL = LostCall(
    model="gpt-4o-mini", deployment="openai-main", provider="openai", cost_usd=Decimal(1)
)
"""A call of J1's, priced at 1 USD."""


async def _owner_and_successor(
    settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool
) -> tuple[Claims, Claims]:
    """Two workers' claims, w1 (started) to hold a job and w2 to take it over."""
    owner, successor = (_claims(settings, redis_client, pool, name) for name in ("w1", "w2"))
    await owner.start()
    return owner, successor


async def test_a_first_call_recorded_with_the_claim_is_lost_with_its_owner(
    settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool
) -> None:
    # Given a job claimed with the record of its first call in the claim's round trip
    owner, successor = await _owner_and_successor(settings, redis_client, pool)
    job, call = J1, CALL
    claim = await owner.take(job, redelivered=False, first=call)
    assert isinstance(claim, Claim) and claim.recorded == "openai-main"

    # When its owner lets it go (as its lease lapses when it dies) and another delivery takes it
    await claim.abandon()
    taken = await successor.take(job, redelivered=False)

    # Expect the call billed as lost, as one recorded on its own before it left, naming the
    # claim that made it (an owner that lived after all then bills it no more)
    assert isinstance(taken, Claim)
    assert [lost.model_copy(update={"claim": None}) for lost in taken.lost] == [call]
    assert (taken.lost[0].claim or "").startswith("w1/")


@pytest.mark.parametrize("then", ["taken over", "answered", "claim lost"])
async def test_an_owner_whose_claim_was_taken_over_makes_no_more_calls(
    settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool, then: str
) -> None:
    # Given a job claimed and its first call recorded, its owner then stalled past its lease
    owner, successor = await _owner_and_successor(settings, redis_client, pool)
    job, call = J1, CALL
    claim = await owner.take(job, redelivered=False)
    assert isinstance(claim, Claim)
    await claim.record(call)
    keys = Keys(settings.redis_prefix)
    key = keys.claim("alpha", "j1")
    await redis_client.hset(key, "lease", "0")

    # When another delivery takes the claim over, billing that call as lost (and maybe
    # answers the job, ending the claim with its outcome stored; or Redis loses the claim
    # with everything else), and the owner, resumed, is about to call again (its call timed
    # out while it stalled)
    if then == "claim lost":
        await redis_client.delete(key)
    else:
        taken = await successor.take(job, redelivered=False)
        assert isinstance(taken, Claim) and len(taken.lost) == 1
        if then == "answered":
            await redis_client.delete(key)
            await redis_client.set(keys.result("alpha", "j1"), "{}")

    # Expect it stopped before the call leaves, which nothing would bill, when taken over or
    # answered; and going on when the claim is gone with the rest (its own outcome bills
    # its calls then)
    if then == "claim lost":
        await claim.record(call)
    else:
        with pytest.raises(Busy, match="taken over by another delivery"):
            await claim.record(call)


@pytest.mark.parametrize("ending", ["past its deadline", "without reply_to", "over budget"])
async def test_a_job_its_dead_owner_reserved_ends_uncalled_leaving_no_reservation(
    settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool, ending: str
) -> None:
    # Given a team with a $1 budget, and a job whose owner reserved $0.30 of it and claimed
    # it, then died waiting for the team's rate limit (no call made; its lease lapsed)
    keys, month = Keys(settings.redis_prefix), current_month()
    config = TeamConfig(budget_usd=Decimal(1))
    # (over budget: the budget was then lowered below any job's estimate)
    lowered = TeamConfig(budget_usd=Decimal("0.000001"))
    await register(settings, "alpha", lowered if ending == "over budget" else config)
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        passed = datetime.now(UTC) - timedelta(seconds=1)
        job = client.job(
            "gpt-4o-mini", HELLO, deadline=passed if ending == "past its deadline" else None
        )
        dead = _claims(settings, redis_client, pool, "dead")
        assert isinstance(await dead.take(job, redelivered=False), Claim)
        scripts = Scripts(redis_client, keys)
        budgets = Budgets(redis_client, scripts, keys, pool, lease=600, slack=60)
        await budgets.reserve("alpha", job.model, config, to_nano(Decimal("0.3")), job.job_id)
        await redis_client.hset(keys.claim("alpha", job.job_id), "lease", "0")
        assert await ledger_spent(redis_client, keys, "alpha", month) == Decimal("0.3")

        # When the job is delivered again and ends uncalled: refused past its deadline, for
        # want of a reply queue, or over budget
        reply_to = None if ending == "without reply_to" else client.reply_to
        await gw.publish(job.model_dump_json().encode(), message_id=job.job_id, reply_to=reply_to)
        [row] = await gw.usage_rows(1)

    # Expect its dead owner's reservation gone with it: the ledger holds what the usage rows
    # do (nothing), not $0.30 until the entry lapses (a lease and a minute later)
    refused = {"past its deadline": "deadline_exceeded", "over budget": "budget_exhausted"}
    assert row["error_code"] == refused.get(ending, "invalid_request")
    assert row["cost_usd"] == 0 and gw.mock.stats.calls == 0
    assert await ledger_spent(redis_client, keys, "alpha", month) == 0
    assert await ledgers_in_force(redis_client, keys, "alpha", month, [None]) == [0]


MARKED = [
    {
        "role": "system",
        "content": [
            {"type": "text", "text": "Be brief. " * 40, "cache_control": {"type": "ephemeral"}}
        ],
    },
    *HELLO,
]
"""A prompt marked to be written to a cache."""


@pytest.mark.parametrize("ending", ["answered", "failed", "swept", "recorded without tokens"])
async def test_a_job_ended_after_a_lost_call_has_its_estimated_tokens_on_its_row(
    settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool, ending: str
) -> None:
    # Given a job marking its prompt for a cache whose dead owner recorded its call (at the
    # job's estimate, as a worker does; or as a worker did before tokens were kept, at its
    # cost alone), its lease then lapsing; past its deadline when it is to be swept (its
    # queue has expired it: no delivery comes back), and a sweep five times a second
    settings = settings.model_copy(update={"teams_refresh": 0.2})
    refused = MockConfig(default=Behavior(error_rate=1, error_status=400))
    mock_config = refused if ending == "failed" else None
    async with (
        running_gateway(settings, mock_config=mock_config) as gw,
        gw.client("alpha") as client,
    ):
        passed = datetime.now(UTC) - timedelta(seconds=10)
        deadline = passed if ending == "swept" else None
        job = client.job("gpt-4o-mini", MARKED, max_tokens=50, deadline=deadline)
        catalog = load_catalog(None, {"QUEUEGATE_MOCK_URL": gw.mock.url})
        needed = estimate(job, catalog, TeamConfig(), 256)
        call = planned_call(job.model, catalog.resolve(job.model).deployments[0], needed)
        if ending == "recorded without tokens":
            kept = {"model", "deployment", "provider", "cost_usd"}
            call = LostCall.model_validate_json(call.model_dump_json(include=kept))
        dead = _claims(settings, redis_client, pool, "dead")
        await dead.start()
        claim = await dead.take(job, redelivered=False, first=call)
        assert isinstance(claim, Claim) and claim.recorded
        await claim.abandon()

        # When the job is delivered again and answered, or fails (the provider refuses the
        # call), or is swept
        result = None
        if ending != "swept":
            result = await (await client.submit(job)).result(timeout=10)
        [row] = await gw.usage_rows(1)

    # Expect its row to bill the lost call at its estimate and to count its estimated tokens
    # (the prompt as written to the cache) beside the answer's own, tokens_estimated, as the
    # client is told (before: its cost alone, tokens_estimated None); a call recorded
    # without its tokens billed at its cost alone, as then
    assert row["attempt_log"][0]["error"] == "lost"
    answered = result.response["usage"] if result and result.response else {}
    own = (answered.get("prompt_tokens", 0), answered.get("completion_tokens", 0), 0)
    lost = (call.input_tokens, call.output_tokens, call.cache_write_tokens)
    tokens = (row["input_tokens"], row["output_tokens"], row["cache_write_tokens"])
    if ending == "recorded without tokens":
        assert lost == (0, 0, 0) and tokens == own
        assert row["tokens_estimated"] is None
    else:
        assert lost == (needed.prompt_tokens, 50, needed.prompt_tokens)
        assert tokens == tuple(map(sum, zip(own, lost, strict=True)))
        assert row["tokens_estimated"] is True
    if result is not None:
        assert result.status == ("error" if ending == "failed" else "ok")
        assert result.gateway is not None
        assert result.gateway.tokens_estimated == row["tokens_estimated"]
        assert result.gateway.cost_usd == Decimal(row["cost_usd"])
    assert call.cost_usd > 0
    codes = {"failed": "invalid_request", "swept": "deadline_exceeded"}
    if ending in codes:  # billed for the lost call alone
        assert (row["error_code"], Decimal(row["cost_usd"])) == (codes[ending], call.cost_usd)
    else:
        assert row["error_code"] is None and Decimal(row["cost_usd"]) > call.cost_usd


def _expired(job: ClaimedJob) -> Outcome:
    return failed(job.job_id, job.team, job.model, DeadlineExceeded("expired"), Timing(0, "t"))


def _claims(
    settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool, name: str
) -> Claims:
    """A worker's claims, with a lease of 5 s."""
    return Claims(
        redis_client,
        Keys(settings.redis_prefix),
        UsageRecord(pool),
        worker=name,
        lease=5.0,
        wait=10.0,
        ttl=60,
        lookup_wait=5.0,
        delivery_limit=5,
    )


async def _lapsed_jobs(dead: Claims, count: int) -> list[ChatJob]:
    """``count`` jobs past their deadlines (and a lease) whose owner (``dead``) recorded a
    call, then died (its leases lapsed)."""
    await dead.start()
    passed = datetime.now(UTC) - timedelta(seconds=10)
    hello = [{"role": "user", "content": "hi"}]
    jobs = [
        ChatJob(job_id=f"j{i}", team="alpha", model="gpt-4o-mini", messages=hello, deadline=passed)
        for i in range(count)
    ]
    call = LostCall(model="gpt-4o-mini", deployment="d", provider="p", cost_usd=Decimal(1))
    for job in jobs:
        claim = await dead.take(job, redelivered=False)
        assert isinstance(claim, Claim)
        await claim.record(call)
        await claim.abandon()
    return jobs


async def test_a_lapsed_claim_is_taken_once_by_racing_sweeps_and_a_late_delivery(
    settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool
) -> None:
    keys = Keys(settings.redis_prefix)

    def worker(name: str) -> Claims:
        return _claims(settings, redis_client, pool, name)

    # Given 30 jobs past their deadlines whose owners died with a call recorded
    jobs = await _lapsed_jobs(worker("dead"), 30)
    assert await redis_client.zcard(keys.lapsing) == 30

    # When three workers sweep while each job is delivered once more, all at once, and
    # whoever takes a job's claim stores its outcome (a sweep once it has sent its usage
    # event, a delivery before: its batch confirmed after)
    answered: list[str] = []

    async def sweep(claims: Claims) -> list[tuple[str, int]]:
        taken = await claims.lapsed()
        answered.extend(key for key, _ in taken.answered)
        for claim in taken.claims:
            await claim.finish(_expired(claim.job), accounted=True)
        return [(claim.job.job_id, len(claim.lost)) for claim in taken.claims]

    late = worker("late")

    async def deliver(job: ChatJob) -> list[tuple[str, int]]:
        claim = await late.take(job, redelivered=False)
        if not isinstance(claim, Claim):
            return []  # answered from the outcome a sweep stored
        await claim.finish(_expired(claim.job))
        await late.accounted([keys.claim(job.team, job.job_id)])
        return [(job.job_id, len(claim.lost))]

    sweepers = [worker(f"sweeper-{i}") for i in range(3)]
    taken = await asyncio.gather(*map(sweep, sweepers), *map(deliver, jobs))

    # Expect each job's lost call taken by exactly one of them, no usage event sent again
    # for one a delivery answered, and nothing left to sweep
    billed = [entry for entries in taken for entry in entries]
    assert Counter(job_id for job_id, _ in billed) == {job.job_id: 1 for job in jobs}
    assert all(lost == 1 for _, lost in billed)
    assert answered == []
    assert await redis_client.zcard(keys.lapsing) == 0


async def test_a_lapsed_claim_keeps_where_its_job_is_answered_for_the_sweep(
    settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool
) -> None:
    # Given two jobs past their deadlines whose owner died with a call recorded: one with
    # its first call recorded with its claim, one on its own, only the first with a reply
    # queue
    dead = _claims(settings, redis_client, pool, "dead")
    await dead.start()
    passed = datetime.now(UTC) - timedelta(seconds=10)
    hello = [{"role": "user", "content": "hi"}]
    first, second = (
        ChatJob(job_id=name, team="alpha", model="gpt-4o-mini", messages=hello, deadline=passed)
        for name in ("with-first", "on-its-own")
    )
    call = LostCall(model="gpt-4o-mini", deployment="d", provider="p", cost_usd=Decimal(1))
    taken = await dead.take(first, redelivered=False, first=call, reply_to="q.replies.alpha.1")
    assert isinstance(taken, Claim) and taken.recorded == "d"
    alone = await dead.take(second, redelivered=False)
    assert isinstance(alone, Claim)
    await alone.record(call)
    for claim in (taken, alone):
        await claim.abandon()

    # When a worker sweeps
    swept = await _claims(settings, redis_client, pool, "sweeper").lapsed()

    # Expect each claim taken with the reply queue its job is answered at, if any
    replies = {claim.job.job_id: claim.job.reply_to for claim in swept.claims}
    assert replies == {"with-first": "q.replies.alpha.1", "on-its-own": None}
    for claim in swept.claims:
        await claim.finish(_expired(claim.job), accounted=True)


async def test_a_lapsed_claim_of_a_job_usage_log_records_is_not_swept(
    settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool
) -> None:
    # Given a job past its deadline whose owner died with a call recorded, though its
    # usage row, billing that call, is written (the store of its outcome was lost to a
    # Redis fault)
    [job] = await _lapsed_jobs(_claims(settings, redis_client, pool, "dead"), 1)
    usage = _expired(ClaimedJob.of(job)).usage
    await insert_usage(pool, [usage.model_copy(update={"attempts": 1})])

    # When a worker sweeps
    swept = await _claims(settings, redis_client, pool, "sweeper").lapsed()

    # Expect nothing to bill, and the claim off the lapsing claims (left to its lease)
    assert swept == Lapsed([], [])
    assert await redis_client.zcard(Keys(settings.redis_prefix).lapsing) == 0


async def test_an_answered_job_whose_usage_was_never_confirmed_is_swept_once_until_it_is(
    settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool
) -> None:
    keys = Keys(settings.redis_prefix)
    # Given jobs with deadlines whose owner recorded a call and stored each one's outcome,
    # each answered at a reply queue of its own
    owner = _claims(settings, redis_client, pool, "owner")
    await owner.start()
    deadline = datetime.now(UTC) + timedelta(seconds=60)
    call = LostCall(model="gpt-4o-mini", deployment="d", provider="p", cost_usd=Decimal(1))
    outcomes: dict[str, Outcome] = {}
    for job_id in ("confirmed", "unconfirmed"):
        job = ChatJob(
            job_id=job_id, team="alpha", model="gpt-4o-mini", messages=HELLO, deadline=deadline
        )
        claim = await owner.take(job, redelivered=False, reply_to=f"q.replies.alpha.{job_id}")
        assert isinstance(claim, Claim)
        await claim.record(call)
        outcomes[job_id] = await claim.finish(_expired(claim.job))
    # ... the usage batch of one confirmed, the other's never (its worker died)
    await owner.accounted([keys.claim("alpha", "confirmed")])

    # When both deadlines and a lease pass (their entries on the lapsing claims are due;
    # set so here), and three workers sweep at once
    unconfirmed = keys.claim("alpha", "unconfirmed")
    await redis_client.zadd(keys.lapsing, {unconfirmed: 0}, xx=True)
    sweeps = [_claims(settings, redis_client, pool, f"sweeper-{i}") for i in range(3)]
    swept = await asyncio.gather(*(claims.lapsed() for claims in sweeps))

    # Expect exactly one to send the unconfirmed job's stored outcome again, to the reply
    # queue it was answered at (its claim, which kept it, ended with the store), none to
    # bill a call, and its entry due a lease later (should that sweep's batch fail too)
    answered = [entry for lapsed in swept for entry in lapsed.answered]
    assert [(key, outcome.usage, outcome.reply_to) for key, outcome in answered] == [
        (unconfirmed, outcomes["unconfirmed"].usage, "q.replies.alpha.unconfirmed")
    ]
    assert not await redis_client.exists(unconfirmed)
    assert [claim for lapsed in swept for claim in lapsed.claims] == []
    due = await redis_client.zscore(keys.lapsing, unconfirmed)
    assert due is not None and due > datetime.now(UTC).timestamp() * 1000
    # ... and nothing left once that batch is confirmed
    await sweeps[0].accounted([unconfirmed])
    assert await redis_client.zcard(keys.lapsing) == 0


def _fields_that_may_be_none(model: type[BaseModel]) -> dict[str, object]:
    """Every field of ``model`` and of the models it holds that may be None, with its default."""
    found: dict[str, object] = {}
    for name, field in model.model_fields.items():
        if type(None) in get_args(field.annotation):
            found[f"{model.__name__}.{name}"] = field.get_default(call_default_factory=True)
        for nested in _models_in(field.annotation):
            found |= _fields_that_may_be_none(nested)
    return found


def _models_in(annotation: object) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in get_args(annotation) for model in _models_in(arg)]


def test_every_field_of_a_result_that_may_be_none_defaults_to_none() -> None:
    # A result is announced, and stored, without its fields that are None: each must read
    # back as None, not as another default.
    fields = _fields_that_may_be_none(ChatResult)
    assert "GatewayInfo.model_used" in fields and "ErrorInfo.param" in fields
    assert {name: default for name, default in fields.items() if default is not None} == {}


@pytest.mark.parametrize("served", [True, False], ids=["served", "failed"])
async def test_a_stored_outcome_reads_back_and_is_announced_as_the_one_stored(
    settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool, served: bool
) -> None:
    # Given a job claimed, its outcome (answered, or failed with an error) stored
    claims = _claims(settings, redis_client, pool, "owner")
    job = ChatJob(job_id="j1", team="alpha", model="gpt-4o-mini", messages=HELLO)
    claim = await claims.take(job, redelivered=False)
    assert isinstance(claim, Claim)
    attempt = Attempt(model="gpt-4o-mini", deployment="d", provider="p", status=200)
    outcome = (
        served_outcome(
            job,
            Routed(
                response={"id": "c1", "choices": [], "usage": None},
                model_used="gpt-4o-mini",
                deployment="d",
                provider="p",
                fallback_used=False,
                attempts=[attempt],
                input_tokens=3,
                output_tokens=5,
                cached_tokens=0,
                cost_usd=Decimal("0.000012"),
                latency_ms=1.5,
            ),
            Timing(2.5, "w"),
        )
        if served
        else _expired(claim.job)
    )
    assert await claim.finish(outcome, dumped=as_json(outcome)) is outcome
    # When another delivery of the job takes it
    stored = await claims.take(job, redelivered=True)
    # Expect the stored outcome, announced with the same bytes as the one stored
    assert stored == outcome
    assert isinstance(stored, Outcome)
    again, first = Announcement.of(stored, "q"), Announcement.of(outcome, "q")
    assert (again.result, again.usage) == (first.result, first.usage)


async def test_a_missed_claims_conflict_with_an_answered_request_tells_what_that_answer_cost(
    settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool
) -> None:
    # Given a request answered under id j1 at a cost
    claims = _claims(settings, redis_client, pool, "owner")
    job = ChatJob(job_id="j1", team="alpha", model="gpt-4o-mini", messages=HELLO)
    claim = await claims.take(job, redelivered=False)
    assert isinstance(claim, Claim)
    routed = Routed(
        response={"id": "c1", "choices": [], "usage": None},
        model_used="gpt-4o-mini",
        deployment="d",
        provider="p",
        fallback_used=False,
        attempts=[Attempt(model="gpt-4o-mini", deployment="d", provider="p", status=200)],
        input_tokens=3,
        output_tokens=5,
        cached_tokens=0,
        cost_usd=Decimal("0.000012"),
        latency_ms=1.5,
    )
    outcome = served_outcome(job, routed, Timing(2.5, "w"))
    await claim.finish(outcome, dumped=as_json(outcome))

    # When a different request under j1, which missed its claim (Redis away) and may have
    # reserved the id's budget entry meanwhile, takes it up
    other = ChatJob(job_id="j1", team="alpha", model="gpt-4o", messages=HELLO)
    missed = Claim(
        claims,
        ClaimedJob.of(other),
        "0" * 64,
        Keys(settings.redis_prefix).claim("alpha", "j1"),
        missed=True,
    )
    with pytest.raises(Duplicate) as refused:
        await missed.take_up(other)

    # Expect it refused as a conflict, knowing what the answer its entry stood for cost
    assert isinstance(refused.value.found, IdempotencyConflict)
    assert refused.value.answered_usd == Decimal("0.000012")


def test_an_outcome_that_cannot_be_written_is_a_billed_error_that_can() -> None:
    # Given a served job whose answer pydantic cannot write (nested past its 200 levels): a
    # worker failed writing it, and the job went back to its queue with its claim held
    deep: list[object] = []
    for _ in range(300):
        deep = [deep]
    job = ChatJob(job_id="j1", team="alpha", model="gpt-4o-mini", messages=HELLO)
    routed = Routed(
        response={"id": "c1", "choices": [], "x": deep},
        model_used="gpt-4o-mini",
        deployment="d",
        provider="p",
        fallback_used=False,
        attempts=[Attempt(model="gpt-4o-mini", deployment="d", provider="p", status=200)],
        input_tokens=3,
        output_tokens=5,
        cached_tokens=0,
        cost_usd=Decimal("0.000012"),
        latency_ms=1.5,
    )
    outcome = served_outcome(job, routed, Timing(2.5, "w"))
    with pytest.raises(Exception, match="depth"):
        as_json(outcome)
    # When it is made writable
    written = unwritable(outcome)
    result, usage = as_json(written)
    # Expect a provider_error billed as served: its answer out, its usage and cost kept
    assert written.result.status == "error" and written.result.response is None
    assert written.result.error is not None and written.result.error.code == "provider_error"
    assert (written.usage.status, written.usage.error_code) == ("error", "provider_error")
    assert written.usage.cost_usd == Decimal("0.000012") and written.usage.output_tokens == 5
    assert b"provider_error" in result and b"0.000012" in usage
