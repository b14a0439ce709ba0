"""Chaos 4: a thousand malformed messages mixed into a thousand good jobs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import aio_pika
import orjson
import pytest

from producer import JobHandle
from queuegate.settings import Settings
from tests.chaos.harness import Figures, collect, dead_lettered, submit_all, usage_rows
from tests.support import running_gateway

GOOD = 1000
BAD = 1000
HUGE = 5
"""10 MB bodies among the bad ones: enough to prove the point without filling the broker."""
HELLO = [{"role": "user", "content": "Hello"}]


def _job(job_id: str, **fields: object) -> dict[str, object]:
    return {"job_id": job_id, "team": "alpha", "model": "gpt-4o-mini", "messages": HELLO} | fields


BAD_KINDS: list[Callable[[str, int], bytes]] = [
    # not JSON at all
    lambda jid, i: bytes((i * 7 + k * 13) % 256 for k in range(64)),
    # valid JSON of the wrong shape
    lambda jid, i: orjson.dumps([[1, 2, 3], "job", None, 3.5][i % 4]),
    # wrong types
    lambda jid, i: orjson.dumps(_job(jid, model=42, messages="hi")),
    # missing fields
    lambda jid, i: orjson.dumps({"job_id": jid, "team": "alpha"}),
    # a model no catalog has
    lambda jid, i: orjson.dumps(_job(jid, model=f"gpt-∞-{i}")),
    # deadlines that are no time at all
    lambda jid, i: orjson.dumps(_job(jid, deadline=["next tuesday", "2026-13-45T99:00"][i % 2])),
    # unicode junk: invalid UTF-8, a lone surrogate escape, a zero-width space in the team
    lambda jid, i: [
        b'{"job_id": "' + jid.encode() + b'", "team": "al\xed\xa0\x80pha"}',
        b'{"job_id": "' + jid.encode() + b'", "team": "alpha", "model": "\\ud800"}',
        orjson.dumps(_job(jid, team="alpha\u200b")),
    ][i % 3],
    # another team's job on this team's queue
    lambda jid, i: orjson.dumps(_job(jid, team="beta")),
    # a body whose job id is not the message's
    lambda jid, i: orjson.dumps(_job(f"someone-else-{i}")),
    # parameters out of range, and a few 10 MB bodies
    lambda jid, i: (
        orjson.dumps(_job(jid, messages=[{"role": "user", "content": "x" * 10_000_000}]))
        if i < HUGE * len(BAD_KINDS)
        else orjson.dumps(_job(jid, params={"max_tokens": -5, "temperature": "hot"}))
    ),
]


async def test_malformed_messages_are_answered_and_dead_lettered_without_hurting_good_jobs(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    figures = Figures("1,000 malformed among 1,000 good")
    caplog.set_level(logging.WARNING)
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(gw.topology.jobs_exchange)
            gate = asyncio.Semaphore(100)

            async def publish_bad(i: int) -> str | None:
                job_id = f"bad-{i}"
                body = BAD_KINDS[i % len(BAD_KINDS)](job_id, i)
                # Every tenth one has nowhere to be answered: it can only be dead-lettered.
                reply_to = None if i % 10 == 9 else client.reply_to
                async with gate:
                    await exchange.publish(
                        aio_pika.Message(
                            body, message_id=job_id, correlation_id=job_id, reply_to=reply_to
                        ),
                        routing_key="alpha",
                    )
                return job_id if reply_to else None

            # When bad messages and good jobs are published together
            bad = asyncio.gather(*(publish_bad(i) for i in range(BAD)))
            good, answerable = await asyncio.gather(submit_all([client], GOOD), bad)
            figures.sent = GOOD + BAD

            # Expect every good job answered ok
            results = await collect(good, timeout=90)
            assert all(r.status == "ok" for r in results)
            # ... every bad one that can be answered, answered with the error it deserves
            errors = await collect([JobHandle(j, client) for j in answerable if j], timeout=30)
            codes = {r.error.code for r in errors if r.error}
            assert len(errors) == BAD - BAD // 10
            assert all(r.status == "error" for r in errors)
            assert codes == {"invalid_request", "unknown_model", "unauthorized"}
            figures.answered = len(results) + len(errors)
            figures.duplicates = client.duplicates
            # ... every bad one dead-lettered, and each job accounted once
            dead = figures.dead_lettered = await dead_lettered(settings, BAD, timeout=30)
            rows, distinct = await usage_rows(gw.pool, GOOD + BAD, timeout=30)
            figures.usage_rows = rows
            figures.provider_calls = gw.mock.stats.calls
            figures.done()
            assert dead == BAD
            assert rows == distinct == GOOD + BAD
            assert gw.mock.stats.calls == GOOD
            # ... and no job ever crashed the worker back into its queue
            assert not [r for r in caplog.records if "failed in the worker" in str(r.msg)]
