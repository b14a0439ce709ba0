"""A batch's state in the real Redis, as the worker keeps it (workers/batch_state.py): steps
larger than one script call takes, read and written as one."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import redis.asyncio as aioredis

from queuegate.control import BatchMeta, job_id
from queuegate.keys import Keys
from queuegate.settings import Settings
from workers.batch_state import SCRIPT_SHARE, BatchState

STEP = 2 * SCRIPT_SHARE + 7
"""Requests in a step: past two script calls."""


def meta() -> BatchMeta:
    return BatchMeta(
        name="nightly",
        team="alpha",
        format="openai",
        total=STEP,
        deadline=datetime.now(UTC) + timedelta(hours=1),
        fingerprint="f" * 64,
        submission="s1",
    )


async def test_an_index_step_gives_each_custom_id_the_line_that_holds_it_first(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    state = BatchState(redis_client, Keys(settings.redis_prefix), "alpha", "nightly", "ab12")
    # Given a first step of STEP custom ids, the last one twice
    first = [(f"req-{i}", i + 1) for i in range(STEP - 1)] + [(f"req-{STEP - 2}", STEP)]
    assert await state.index(first) == [*range(1, STEP), STEP - 1]
    # When a second step repeats every third id under new lines, beside new ids
    second = [(f"req-{i}", 10_000 + i) for i in range(0, STEP - 1, 3)] + [("new", 20_000)]
    # Expect the repeats to keep their first lines, the new id its own, in the order sent
    assert await state.index(second) == [*range(1, STEP, 3), 20_000]
    assert await state.index([]) == []


async def test_outcomes_among_says_stored_held_or_neither_for_each_request(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    keys = Keys(settings.redis_prefix)
    batch = meta()
    state = BatchState(redis_client, keys, "alpha", "nightly")
    ids = [f"req-{i}" for i in range(STEP)]
    now_ms = time.time() * 1000
    # Given, in turn: an outcome stored; a claim whose lease runs; a claim lapsed with a call in
    # flight; a claim lapsed with none; a claim without an owner; nothing at all
    kinds = ["stored", "live", "in-flight", "lapsed", "ownerless", "none"]
    expected = {
        "stored": "stored",
        "live": "held",
        "in-flight": "held",
        "lapsed": None,
        "ownerless": None,
        "none": None,
    }
    for i, custom_id in enumerate(ids):
        job = job_id(batch.jobs, custom_id)
        claim = keys.claim("alpha", job)
        match kinds[i % len(kinds)]:
            case "stored":
                await redis_client.set(keys.result("alpha", job), b"{}")
            case "live":
                await redis_client.hset(claim, mapping={"owner": "w1", "lease": now_ms + 60_000})
            case "in-flight":
                await redis_client.hset(
                    claim, mapping={"owner": "w1", "lease": now_ms - 60_000, "attempt": 1}
                )
            case "lapsed":
                await redis_client.hset(claim, mapping={"owner": "w1", "lease": now_ms - 60_000})
            case "ownerless":
                await redis_client.hset(claim, mapping={"lease": now_ms + 60_000})
    # When a collect asks for all of them in one step
    found = await state.outcomes_among(batch, ids)
    # Expect each request's own answer, across the script calls the step took
    assert found == [expected[kinds[i % len(kinds)]] for i in range(STEP)]
    # And another team's records of the same jobs tell nothing of this team's
    other = BatchState(redis_client, keys, "beta", "nightly")
    assert await other.outcomes_among(batch, ids) == [None] * STEP
