"""Accounting against the real broker and PostgreSQL: rows, idempotency, dead letters, reports."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage

import accounting
from accounting import Accountant, TeamSpend, migrate, monthly_spend
from accounting.consumer import IN_FLIGHT
from accounting.migrate import available_migrations
from accounting.reports import month_range
from accounting.store import COLUMNS, insert_usage
from queuegate.broker import json_message, publish
from queuegate.db import create_pool
from queuegate.errors import ServiceUnavailable
from queuegate.messages import Attempt, AuditContent, UsageBatch, UsageEvent, usage_batch_body
from queuegate.settings import Settings
from queuegate.topology import MESSAGE_TYPE_USAGE, MESSAGE_TYPE_USAGE_BATCH, Topology
from queuegate.usage_log import accounted

WAIT = 5.0
"""Seconds any awaited outcome may take before the test fails."""


def usage(job_id: str, **fields: Any) -> UsageEvent:
    values: dict[str, Any] = {
        "team": "alpha",
        "model_requested": "gpt-mini",
        "model_used": "gpt-mini",
        "provider": "openai",
        "deployment": "openai-main",
        "input_tokens": 120,
        "output_tokens": 30,
        "cost_usd": Decimal("0.0001234567"),
        "status": "ok",
        "worker": "w1",
    }
    return UsageEvent(job_id=job_id, **(values | fields))


@pytest.fixture
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(settings)
    yield pool
    await pool.close()


@pytest.fixture
async def usage_exchange(settings: Settings) -> AsyncIterator[AbstractExchange]:
    """The usage exchange on a channel with publisher confirms, as workers publish."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        topology = Topology(settings.namespace)
        yield await topology.declare_usage(channel)


async def send_usage(exchange: AbstractExchange, *bodies: bytes | UsageEvent) -> None:
    """One message per body, each a single event (type ``usage``, as workers before batches
    sent them) or any bytes."""
    # Each publish returns once the broker confirms it: the message is in the queue.
    for body in bodies:
        raw = body.model_dump_json().encode() if isinstance(body, UsageEvent) else body
        message = json_message(raw, message_type=MESSAGE_TYPE_USAGE)
        await publish(exchange.channel, message, exchange=exchange.name, routing_key="")


async def send_batch(exchange: AbstractExchange, *events: UsageEvent | bytes) -> None:
    """One ``usage-batch`` message of these events, built as a worker builds it."""
    raw = [e.model_dump_json().encode() if isinstance(e, UsageEvent) else e for e in events]
    message = json_message(usage_batch_body(raw), message_type=MESSAGE_TYPE_USAGE_BATCH)
    await publish(exchange.channel, message, exchange=exchange.name, routing_key="")


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Accountant]:
    stop = asyncio.Event()
    async with Accountant(settings) as accountant:
        task = asyncio.create_task(accountant.run(stop))
        try:
            yield accountant
        finally:
            stop.set()
            async with asyncio.timeout(WAIT):
                await task


async def wait_until(accountant: Accountant, predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT):
        await accountant.wait_until(predicate)


async def dead_letters(settings: Settings, count: int) -> list[AbstractIncomingMessage]:
    """The next ``count`` messages of the dead-letter queue, acknowledged."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(Topology(settings.namespace).dead_queue)
        messages: list[AbstractIncomingMessage] = []
        async with asyncio.timeout(WAIT), queue.iterator() as incoming:
            async for message in incoming:
                await message.ack()
                messages.append(message)
                if len(messages) == count:
                    break
        return messages


async def queued(settings: Settings) -> int:
    """Messages waiting in the accounting queue: after the accountant closed, what it left
    unacknowledged is back there."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        name = Topology(settings.namespace).accounting_queue
        queue = await channel.declare_queue(name, passive=True)
        return queue.declaration_result.message_count or 0


async def row_count(pool: asyncpg.Pool) -> int:
    count: int = await pool.fetchval("SELECT count(*) FROM usage_log")
    return count


def test_public_api_is_pinned() -> None:
    assert accounting.__all__ == [
        "Accountant",
        "TeamSpend",
        "migrate",
        "monthly_spend",
    ]


def test_every_usage_event_field_has_a_column() -> None:
    # Captured content has its own table, audit_content.
    assert {name for name, _ in COLUMNS} == set(UsageEvent.model_fields) - {"v", "content"}


async def test_migrations_apply_once_when_two_processes_start_together(
    settings: Settings,
) -> None:
    # Given two pools, as two processes starting at once would have
    first, second = await create_pool(settings), await create_pool(settings)
    try:
        # When both migrate concurrently, then once more
        results = await asyncio.gather(
            migrate(first, settings.database_schema), migrate(second, settings.database_schema)
        )
        again = await migrate(first, settings.database_schema)

        # Expect every migration applied exactly once between them (which process applies
        # which is a matter of who takes the lock first), and nothing left to apply
        shipped = [(m.version, m.name) for m in available_migrations()]
        assert sorted(results[0] + results[1]) == [version for version, _ in shipped]
        assert again == []
        ledger = await first.fetch("SELECT version, name FROM schema_migrations ORDER BY 1")
        assert [tuple(row) for row in ledger] == shipped
        tables = await first.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1",
            settings.database_schema,
        )
        assert {"schema_migrations", "usage_log", "teams"} <= {row["table_name"] for row in tables}
    finally:
        await first.close()
        await second.close()


async def test_unreachable_postgres_is_named_without_its_password(settings: Settings) -> None:
    # Given a URL with a password and a port nothing listens on
    bad = settings.model_copy(update={"database_url": "postgresql://app:s3cret@127.0.0.1:1/test"})

    # Expect one clear error that names the server, not the password
    with pytest.raises(ServiceUnavailable) as caught:
        await create_pool(bad)
    message = str(caught.value)
    assert "127.0.0.1:1" in message
    assert "QUEUEGATE_DATABASE_URL" in message
    assert "s3cret" not in message


async def test_published_events_land_as_rows(
    settings: Settings, usage_exchange: AbstractExchange, pool: asyncpg.Pool
) -> None:
    # Given twenty usage events, one of them a failed job that fell back
    events = [usage(f"job-{i}") for i in range(19)]
    failed = usage(
        "job-failed",
        team="beta",
        status="error",
        error_code="all_providers_failed",
        cost_usd=Decimal("0.5000000001"),
        attempts=3,
        attempt_log=[
            Attempt(model="gpt-mini", deployment="openai-main", provider="openai", status=503),
            Attempt(model="gpt-mini", deployment="openai-main", provider="openai", error="timeout"),
            Attempt(model="haiku", deployment="claude", provider="anthropic", status=529),
        ],
        fallback_used=True,
        reply_delivered=False,
        ts=datetime(2025, 3, 1, 12, 30, tzinfo=timezone(timedelta(hours=2))),
    )
    async with running(settings) as accountant:
        # When they are published to the usage exchange
        await send_usage(usage_exchange, *events, failed)
        await wait_until(accountant, lambda: accountant.events_written == 20)

    # Expect one row per event, every field as sent
    assert await row_count(pool) == 20
    assert accountant.rows_inserted == 20
    row = await pool.fetchrow("SELECT * FROM usage_log WHERE job_id = 'job-failed'")
    assert {name: row[name] for name, _ in COLUMNS} == failed.model_dump(exclude={"v", "content"})


async def test_an_accountant_stopped_while_starting_consumes_nothing(
    settings: Settings, usage_exchange: AbstractExchange
) -> None:
    # Given a usage event waiting, and an accountant stopped as it started (the stop set, the
    # cancel of its start swallowed on the way)
    await send_usage(usage_exchange, usage("job-waiting"))
    stop = asyncio.Event()
    async with Accountant(settings) as accountant:
        stop.set()
        # When it runs
        async with asyncio.timeout(WAIT):
            await accountant.run(stop)

    # Expect it to have taken nothing: the event waits in its queue for the next accountant
    assert accountant.messages_received == 0
    queue = await usage_exchange.channel.declare_queue(
        Topology(settings.namespace).accounting_queue, passive=True
    )
    assert queue.declaration_result.message_count == 1


async def test_an_accountant_prepares_its_writes_before_it_consumes(settings: Settings) -> None:
    # Given an accountant started, not yet consuming
    async with Accountant(settings) as accountant:
        pool = accountant._pool  # its own pool: what its batches write on
        assert pool is not None

        # When the connections of the batches it writes at once are taken from its pool
        async with contextlib.AsyncExitStack() as held:
            conns = [await held.enter_async_context(pool.acquire()) for _ in range(IN_FLIGHT)]

            # Expect each opened already, the batch insert prepared on it (a backlog's first
            # batches would otherwise wait for both while their deliveries are held)
            assert pool.get_size() == IN_FLIGHT
            for conn in conns:
                prepared = await conn.fetchval(
                    "SELECT count(*) FROM pg_prepared_statements"
                    " WHERE statement LIKE 'WITH inserted AS (INSERT INTO usage_log %'"
                )
                assert prepared == 1


async def test_an_accountant_stages_each_connection_once_as_it_starts(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given every statement sent by execute (how a connection asks for its staging table)
    # counted by the backend it went to
    sent: dict[int, list[str]] = {}
    execute = asyncpg.Connection.execute

    async def counted(conn: asyncpg.Connection, query: str, *args: Any, **kwargs: Any) -> str:
        sent.setdefault(conn.get_server_pid(), []).append(query)
        return await execute(conn, query, *args, **kwargs)

    monkeypatch.setattr(asyncpg.Connection, "execute", counted)
    # When an accountant starts: its pool's connections opened, its writers' insert prepared
    async with Accountant(settings):
        pass

    # Expect each connection it opened, its writers' too, to have asked for it once: as it
    # opened, not again to prepare the insert
    staged = {pid: sum(q.startswith("CREATE TEMP TABLE") for q in qs) for pid, qs in sent.items()}
    assert len(staged) >= IN_FLIGHT
    assert staged == dict.fromkeys(staged, 1)


async def test_an_event_delivered_three_times_is_one_row(
    settings: Settings, usage_exchange: AbstractExchange, pool: asyncpg.Pool
) -> None:
    # Given an accountant that writes every event in a batch of its own
    one_by_one = settings.model_copy(update={"accounting_batch": 1})
    event = usage("job-repeated")
    async with running(one_by_one) as accountant:
        # When the same event arrives three times
        await send_usage(usage_exchange, event, event, event)
        await wait_until(accountant, lambda: accountant.events_written == 3)

    # Expect three batches written and acknowledged, and one row
    assert accountant.batches == 3
    assert accountant.rows_inserted == 1
    assert await row_count(pool) == 1


async def test_duplicates_within_one_batch_are_one_row(
    settings: Settings, usage_exchange: AbstractExchange, pool: asyncpg.Pool
) -> None:
    # Given an event three times and another once, queued before the accountant starts
    await send_usage(usage_exchange, usage("job-a"), usage("job-a"), usage("job-b"), usage("job-a"))

    # When it takes them all in one batch
    async with running(settings) as accountant:
        await wait_until(accountant, lambda: accountant.events_written == 4)

    # Expect one row per job
    assert accountant.batches == 1
    assert accountant.last_batch_size == 4
    assert accountant.rows_inserted == 2
    assert await row_count(pool) == 2


async def test_a_malformed_body_is_dead_lettered_and_consuming_goes_on(
    settings: Settings, usage_exchange: AbstractExchange, pool: asyncpg.Pool
) -> None:
    async with running(settings) as accountant:
        # When a body that is not JSON and one that is not a UsageEvent arrive before a good one
        await send_usage(usage_exchange, b"not json", b'{"job_id": "x"}', usage("job-good"))
        await wait_until(
            accountant, lambda: accountant.events_rejected == 2 and accountant.events_written == 1
        )

    # Expect both bad bodies in the dead-letter queue, and the good event written
    dead = await dead_letters(settings, 2)
    assert sorted(message.body for message in dead) == [b"not json", b'{"job_id": "x"}']
    assert await row_count(pool) == 1


async def test_a_batch_around_a_malformed_body_is_acknowledged_whole(
    settings: Settings, usage_exchange: AbstractExchange, pool: asyncpg.Pool
) -> None:
    # Given a malformed body queued between good events, before the accountant starts
    await send_usage(usage_exchange, usage("job-1"), b"not json", usage("job-2"), usage("job-3"))

    # When it takes them in one batch, acknowledged by one multiple ack over the rejected tag
    async with running(settings) as accountant:
        await wait_until(
            accountant, lambda: accountant.events_written == 3 and accountant.events_rejected == 1
        )

    # Expect the good events written, the bad one dead-lettered, and none left to redeliver
    assert accountant.batches == 1
    assert await row_count(pool) == 3
    [dead] = await dead_letters(settings, 1)
    assert dead.body == b"not json"
    assert await queued(settings) == 0


async def test_an_event_postgres_cannot_store_is_dead_lettered_alone(
    settings: Settings, usage_exchange: AbstractExchange, pool: asyncpg.Pool
) -> None:
    # Given a valid UsageEvent with a value PostgreSQL refuses (a count no bigint holds),
    # queued among good events so that all share one batch, one of them another team's same
    # job id
    unstorable = usage("job-huge", input_tokens=2**70)
    namesake = usage("job-huge", team="beta")
    await send_usage(usage_exchange, usage("job-1"), unstorable, namesake, usage("job-2"))

    # When the accountant writes the batch
    async with running(settings) as accountant:
        await wait_until(accountant, lambda: accountant.events_rejected == 1)

    # Expect the good events written (the namesake too) and only the bad one dead-lettered
    assert accountant.events_written == 3
    assert await row_count(pool) == 3
    [dead] = await dead_letters(settings, 1)
    assert UsageEvent.model_validate_json(dead.body).job_id == "job-huge"
    assert await queued(settings) == 0


async def test_an_event_with_nul_in_its_text_is_stored_with_it_replaced(
    settings: Settings, usage_exchange: AbstractExchange, pool: asyncpg.Pool
) -> None:
    # Given events holding NUL, which PostgreSQL text cannot store, in every text field a
    # tenant or a provider can fill (a refusal under a key id that held one, its model, an
    # attempt's error, claims), alone and in a batch, and a literal backslash-u0000 text
    nul = {
        "model_requested": "gpt\x00mini",
        "model_used": "gpt\x00mini",
        "provider": "open\x00ai",
        "deployment": "d\x00",
        "error_code": None,
        "worker": "w\x00",
        "identity": "api_key:ab\x00cd",
        "pii": "email\x00",
        "params_dropped": "seed\x00",
        "params_changed": "max_tokens\x00",
        "claim": "c\x00",
        "covers": ["c\x00", "d\x00"],
        "attempt_log": [
            Attempt(model="m\x00", deployment="d\x00", provider="p\x00", error="e\x00")
        ],
    }
    await send_usage(usage_exchange, usage("job-\x00/refused/1", **nul))
    await send_batch(usage_exchange, usage("job-2", **nul), usage("job-\\u0000"))

    # When the accountant writes them
    async with running(settings) as accountant:
        await wait_until(accountant, lambda: accountant.events_written == 3)

    # Expect each its row, every NUL as U+FFFD, the literal text as it was, nothing rejected
    assert accountant.events_rejected == 0
    rows = {r["job_id"]: r for r in await pool.fetch("SELECT * FROM usage_log")}
    assert sorted(rows) == ["job-2", "job-\\u0000", "job-\ufffd/refused/1"]
    for job_id in ("job-\ufffd/refused/1", "job-2"):
        row = rows[job_id]
        for name, value in nul.items():
            if isinstance(value, str):
                assert row[name] == value.replace("\x00", "\ufffd"), name
        assert row["covers"] == ["c\ufffd", "d\ufffd"]
        [attempt] = row["attempt_log"]
        assert (attempt["model"], attempt["error"]) == ("m\ufffd", "e\ufffd")
    assert await queued(settings) == 0


async def test_a_batch_lands_as_one_row_per_event_beside_single_events(
    settings: Settings, usage_exchange: AbstractExchange, pool: asyncpg.Pool
) -> None:
    # Given a worker's batch of three events and, from a worker before batches, one event alone
    await send_batch(usage_exchange, usage("job-1"), usage("job-2"), usage("job-3", team="beta"))
    await send_usage(usage_exchange, usage("job-4"))

    # When the accountant writes them
    async with running(settings) as accountant:
        await wait_until(accountant, lambda: accountant.events_written == 4)

    # Expect one row per event, from two messages, and nothing left queued
    rows = await pool.fetch("SELECT team, job_id FROM usage_log ORDER BY job_id")
    assert [(r["team"], r["job_id"]) for r in rows] == [
        ("alpha", "job-1"),
        ("alpha", "job-2"),
        ("beta", "job-3"),
        ("alpha", "job-4"),
    ]
    assert accountant.messages_received == 2
    assert await queued(settings) == 0


async def test_a_redelivered_batch_counts_each_event_once(
    settings: Settings, usage_exchange: AbstractExchange, pool: asyncpg.Pool
) -> None:
    # Given a batch written, then the same batch again (its worker saw no confirm and its
    # jobs' redeliveries sent their events again: in a batch with others, and one alone)
    batch = [usage(f"job-{i}") for i in range(3)]
    async with running(settings) as accountant:
        await send_batch(usage_exchange, *batch)
        await wait_until(accountant, lambda: accountant.rows_inserted == 3)

        # When the same events arrive again, in the same batch, another, and alone
        await send_batch(usage_exchange, *batch)
        await send_batch(usage_exchange, batch[2], usage("job-3"), batch[0])
        await send_usage(usage_exchange, batch[1])
        await wait_until(accountant, lambda: accountant.events_written == 10)

    # Expect each job counted once: four rows, every message acknowledged
    assert accountant.rows_inserted == 4
    rows = await pool.fetch("SELECT job_id, count(*) AS n FROM usage_log GROUP BY job_id")
    assert {r["job_id"]: r["n"] for r in rows} == {f"job-{i}": 1 for i in range(4)}
    assert await queued(settings) == 0


async def test_a_batch_with_an_event_postgres_cannot_store_is_dead_lettered_whole(
    settings: Settings, usage_exchange: AbstractExchange, pool: asyncpg.Pool
) -> None:
    # Given a batch holding one value PostgreSQL refuses among good events, and a good batch
    await send_batch(usage_exchange, usage("job-1"), usage("job-huge", input_tokens=2**70))
    await send_batch(usage_exchange, usage("job-2"))

    # When the accountant writes them
    async with running(settings) as accountant:
        await wait_until(accountant, lambda: accountant.events_rejected == 1)

    # Expect the good events written, and the batch kept whole in the dead letters: replayed,
    # it writes nothing twice
    assert accountant.events_written == 2
    assert await row_count(pool) == 2
    [dead] = await dead_letters(settings, 1)
    assert dead.type == MESSAGE_TYPE_USAGE_BATCH
    held = UsageBatch.model_validate_json(dead.body).events
    assert [e.job_id for e in held] == ["job-1", "job-huge"]
    assert await queued(settings) == 0


async def test_a_malformed_batch_is_dead_lettered_and_consuming_goes_on(
    settings: Settings, usage_exchange: AbstractExchange, pool: asyncpg.Pool
) -> None:
    # Given a batch with an event missing its team, then a good batch
    await send_batch(usage_exchange, usage("job-1"), b'{"job_id": "x"}')
    await send_batch(usage_exchange, usage("job-2"))

    # When the accountant reads them
    async with running(settings) as accountant:
        await wait_until(accountant, lambda: accountant.events_written == 1)

    # Expect the malformed batch dead-lettered whole and the good one written
    assert accountant.events_rejected == 1
    assert [r["job_id"] for r in await pool.fetch("SELECT job_id FROM usage_log")] == ["job-2"]
    [dead] = await dead_letters(settings, 1)
    assert dead.type == MESSAGE_TYPE_USAGE_BATCH
    assert await queued(settings) == 0


async def test_graceful_stop_writes_what_it_holds(
    settings: Settings, usage_exchange: AbstractExchange, pool: asyncpg.Pool
) -> None:
    # Given an accountant that would wait half a minute to fill a batch, holding five events
    patient = settings.model_copy(update={"accounting_linger": 30.0})
    stop = asyncio.Event()
    async with Accountant(patient) as accountant:
        task = asyncio.create_task(accountant.run(stop))
        await send_usage(usage_exchange, *(usage(f"job-{i}") for i in range(5)))
        await wait_until(accountant, lambda: accountant.events_received == 5)
        assert await row_count(pool) == 0

        # When it is asked to stop
        stop.set()
        async with asyncio.timeout(WAIT):
            await task

    # Expect everything it held written in one last batch
    assert await row_count(pool) == 5
    assert (accountant.batches, accountant.events_written) == (1, 5)


async def test_accounted_names_exactly_the_team_and_job_pairs_with_a_usage_row(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    # Given rows of alpha's job-1 and job-2 and of beta's job-3 (job ids are unique per team),
    # each its own cost
    await migrate(pool, settings.database_schema)
    costs = [Decimal("0.1"), Decimal("0.2"), Decimal("0.3")]
    await insert_usage(
        pool,
        [
            usage("job-1", cost_usd=costs[0]),
            usage("job-2", cost_usd=costs[1]),
            usage("job-3", team="beta", cost_usd=costs[2]),
        ],
    )

    # When alpha's and beta's jobs are asked for across the teams, on a pool and in a
    # transaction as reconciliation asks
    asked = [("alpha", "job-1"), ("beta", "job-1"), ("alpha", "job-3"), ("beta", "job-3")]
    found = await accounted(pool, asked)
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
        in_snapshot = await accounted(conn, [("alpha", "job-2"), ("alpha", "job-9")])

    # Expect only the pairs with a row, each with the cost its row holds: another team's row
    # under the same job id is not one
    assert found == {("alpha", "job-1"): costs[0], ("beta", "job-3"): costs[2]}
    assert in_snapshot == {("alpha", "job-2"): costs[1]}
    assert await accounted(pool, []) == {}


async def test_monthly_spend_equals_sums_of_the_rows(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    # Given usage of three teams around the November/December 2025 boundary, some failed
    await migrate(pool, settings.database_schema)
    rng = random.Random(7)
    edges = [
        datetime(2025, 10, 31, 23, 59, 59, 999_999, tzinfo=UTC),
        datetime(2025, 11, 1, tzinfo=UTC),
        datetime(2025, 12, 1, 1, 0, tzinfo=timezone(timedelta(hours=2))),  # 30 Nov, 23:00 UTC
        datetime(2025, 12, 1, tzinfo=UTC),
    ]
    events = [
        usage(
            f"job-{i}",
            team=rng.choice(["alpha", "beta", "gamma"]),
            status=rng.choice(["ok", "ok", "error"]),
            input_tokens=rng.randrange(10_000),
            output_tokens=rng.randrange(2_000),
            cost_usd=Decimal(rng.randrange(10**9)) / 10**10,
            ts=edges[i] if i < len(edges) else edges[1] + timedelta(hours=rng.randrange(24 * 45)),
        )
        for i in range(300)
    ]
    await insert_usage(pool, events)
    rows = await pool.fetch("SELECT * FROM usage_log")

    for day in (date(2025, 11, 17), date(2025, 12, 31)):
        # When the month's spend is reported
        report = await monthly_spend(pool, day)

        # Expect per-team totals equal to sums over the rows inside that UTC month
        start, end = month_range(day)
        expected: dict[str, TeamSpend] = {}
        for row in rows:
            if not start <= row["ts"] < end:
                continue
            seen = expected.get(row["team"], TeamSpend(row["team"], 0, 0, 0, 0, Decimal(0)))
            expected[row["team"]] = TeamSpend(
                team=row["team"],
                requests=seen.requests + 1,
                errors=seen.errors + (row["status"] == "error"),
                input_tokens=seen.input_tokens + row["input_tokens"],
                output_tokens=seen.output_tokens + row["output_tokens"],
                cost_usd=seen.cost_usd + row["cost_usd"],
            )
        assert sorted(report, key=lambda spend: spend.team) == [
            expected[team] for team in sorted(expected)
        ]
        assert [spend.cost_usd for spend in report] == sorted(
            (spend.cost_usd for spend in report), reverse=True
        )


def test_month_range_wraps_at_the_year_end() -> None:
    assert month_range(date(2025, 12, 31)) == (
        datetime(2025, 12, 1, tzinfo=UTC),
        datetime(2026, 1, 1, tzinfo=UTC),
    )


async def test_a_count_beyond_bigint_fails_the_write_as_a_value_it_cannot_store(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    # Given an event whose token count no bigint holds
    await migrate(pool, settings.database_schema)
    huge = usage("job-huge", input_tokens=2**70)

    # When it is stored, expect the DataError that marks it unstorable (the accountant then
    # dead-letters it alone), and the connection good for the next write
    with pytest.raises(asyncpg.DataError):
        await insert_usage(pool, [huge, usage("job-fine")])
    assert await insert_usage(pool, [usage("job-fine")]) == 1


async def test_captured_content_holding_nul_is_stored_and_billed(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    # Given a full-capture job whose prompt and answer hold NUL (jsonb refuses the escape),
    # beside a prompt whose text is a backslash followed by "u0000"
    await migrate(pool, settings.database_schema)
    nul = usage(
        "job-nul",
        content=AuditContent(
            capture="full",
            prompt=[{"role": "user", "content": "a\x00b"}],
            response={"role": "assistant", "content": "\x00"},
        ),
    )
    literal = usage(
        "job-text",
        content=AuditContent(capture="full", prompt=[{"role": "user", "content": "\\u0000"}]),
    )

    # When they are stored
    inserted = await insert_usage(pool, [nul, literal])

    # Expect both billed, the NUL kept as U+FFFD and the literal text as it was
    assert inserted == 2
    rows = {
        r["job_id"]: r
        for r in await pool.fetch("SELECT job_id, prompt, response FROM audit_content")
    }
    assert rows["job-nul"]["prompt"] == [{"role": "user", "content": "a\ufffdb"}]
    assert rows["job-nul"]["response"] == {"role": "assistant", "content": "\ufffd"}
    assert rows["job-text"]["prompt"] == [{"role": "user", "content": "\\u0000"}]


async def test_a_pool_that_keeps_sessions_still_rolls_back_a_transaction_left_open(
    settings: Settings,
) -> None:
    # Given accounting's pool (sessions not reset when released), of one connection
    pool = await create_pool(settings, max_size=1, reset_sessions=False)
    try:
        await migrate(pool, settings.database_schema)
        # When a connection goes back with a transaction open, a row written in it
        async with pool.acquire() as conn:
            await conn.execute("BEGIN")
            await insert_usage(conn, [usage("job-open")])

        # Expect the next to take it without the transaction, the row rolled back, and
        # unqualified names still resolved in the test's schema
        async with pool.acquire() as conn:
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT count(*) FROM usage_log") == 0
    finally:
        await pool.close()


async def test_an_accountants_connections_get_their_staging_table_once_as_they_open(
    settings: Settings,
) -> None:
    # Given an accountant started, its pool's connections then replaced (as after an outage)
    async with Accountant(settings) as accountant:
        pool = accountant._pool
        assert pool is not None
        await pool.expire_connections()

        # When a batch is written on a connection it opens anew
        sent: list[str] = []
        async with pool.acquire() as conn:
            with conn.query_logger(lambda record: sent.append(record.query)):
                assert await insert_usage(conn, [usage("job-staged")], staged=True) == 1

        # Expect it written without asking for the staging table: the connection made it
        # as it opened, not a round trip a batch
        assert any(query.startswith("WITH inserted AS") for query in sent)
        assert not any("CREATE TEMP TABLE" in query for query in sent)
