"""Token buckets in the real Redis: two dimensions, several scopes, taken all or nothing."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from queuegate.errors import InvalidRequest
from queuegate.keys import Keys
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from workers.admission import prefetch_for
from workers.admission.buckets import Buckets, Limit
from workers.admission.scripts import Scripts


def _buckets(client: aioredis.Redis) -> Buckets:
    return Buckets(Scripts(client))


async def test_a_full_bucket_admits_a_minute_of_its_limit_then_says_how_long_to_wait(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given a team bucket of 6 requests per minute (one every 10 s)
    buckets = _buckets(redis_client)
    limit = Limit(Keys(settings.redis_prefix).team_bucket("alpha"), "team alpha", 6, None)

    # When 6 requests are taken, then one more
    waits = [await buckets.take([limit], 10) for _ in range(6)]
    wait = await buckets.take([limit], 10)

    # Expect the 6 admitted at once, and the next told to wait about 10 s
    assert waits == [0] * 6
    assert 9000 <= wait <= 10_000


async def test_a_take_takes_from_every_scope_or_from_none(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given a team with room for requests and a model scope with 100 tokens per minute
    buckets = _buckets(redis_client)
    keys = Keys(settings.redis_prefix)
    team = Limit(keys.team_bucket("alpha"), "team alpha", 1000, None)
    model = Limit(keys.team_bucket("alpha", "m"), "team alpha on m", None, 100)

    # When a job takes 80 tokens, then another wants 80
    assert await buckets.take([team, model], 80) == 0
    wait = await buckets.take([team, model], 80)

    # Expect the second to wait for the model's tokens, and the team's request not taken
    assert wait > 30_000
    state = await redis_client.hget(team.key, "r")
    assert state is not None and float(state) == pytest.approx(999, abs=0.1)


async def test_settling_a_larger_usage_leaves_debt_and_a_smaller_one_refunds(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given a 600 tokens/minute bucket from which a job reserved 300
    buckets = _buckets(redis_client)
    limit = Limit(Keys(settings.redis_prefix).team_bucket("alpha"), "team alpha", None, 600)
    assert await buckets.take([limit], 300) == 0

    # When the job turns out to have used 900 (600 more than reserved)
    await buckets.settle([limit], -600)

    # Expect the bucket in debt: even a 1-token job waits about 30 s
    debt_wait = await buckets.take([limit], 1)
    assert 29_000 <= debt_wait <= 30_200

    # And when 600 are refunded, the bucket admits again
    await buckets.settle([limit], 600)
    assert await buckets.take([limit], 1) == 0


async def test_a_job_larger_than_a_minute_of_the_limit_is_refused_at_once(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given a 100 tokens/minute bucket
    limit = Limit(Keys(settings.redis_prefix).team_bucket("alpha"), "team alpha", None, 100)

    # When a job needs 101 tokens, expect a clear error rather than an endless wait
    with pytest.raises(InvalidRequest, match="more than team alpha admits in a minute"):
        await _buckets(redis_client).take([limit], 101)


def test_a_slow_team_gets_only_the_slots_its_rate_can_admit_in_time(
    base_settings: Settings,
) -> None:
    # Given 32 slots a team and a 600 s maximum wait
    s = base_settings.model_copy(update={"prefetch": 32, "admission_max_wait": 600})

    # Expect a fast or unlimited team to get them all, a 2 RPM team 10 (2/min over half of 600 s),
    # and a 1 RPM team shared by 10 workers still one
    assert prefetch_for(TeamConfig(), s) == 32
    assert prefetch_for(TeamConfig(rpm=6000), s) == 32
    assert prefetch_for(TeamConfig(rpm=2), s) == 10
    assert prefetch_for(TeamConfig(rpm=1), s.model_copy(update={"admission_workers": 10})) == 1
