"""Token buckets in the real Redis: two dimensions, several scopes, taken all or nothing."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from queuegate.errors import InvalidRequest
from queuegate.keys import Keys
from queuegate.redis_client import redis_for
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from tests.proxy import TcpProxy
from workers.admission import prefetch_for
from workers.admission.buckets import Buckets, Limit, Take, settle_call
from workers.admission.policy import LocalBuckets
from workers.admission.scripts import Call, Scripts


def _buckets(client: aioredis.Redis, settings: Settings) -> Buckets:
    return Buckets(Scripts(client, Keys(settings.redis_prefix)))


async def _settle(
    client: aioredis.Redis,
    settings: Settings,
    limit: Limit,
    tokens_back: int,
    requests_back: int = 0,
) -> None:
    """Give the bucket back ``tokens_back`` and ``requests_back`` (as if its rate refilled it)."""
    call = settle_call([limit], tokens_back, requests_back)
    assert call is not None
    await Scripts(client, Keys(settings.redis_prefix)).run(call)


async def _reserved_behind(
    settings: Settings, redis_client: aioredis.Redis, tokens: int = 300
) -> tuple[Buckets, Limit, Take]:
    """A team bucket of 600 tokens a minute (10 a second) emptied by one job's take, and a
    job of ``tokens`` reserved behind it."""
    buckets = _buckets(redis_client, settings)
    limit = Limit(Keys(settings.redis_prefix).team_bucket("alpha"), "team alpha", None, 600)
    assert (await buckets.take([limit], 600)).taken
    reserved = await buckets.take([limit], tokens, within_ms=120_000)
    assert reserved.taken and reserved.marks
    return buckets, limit, reserved


async def test_a_full_bucket_admits_a_minute_of_its_limit_then_says_how_long_to_wait(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given a team bucket of 6 requests per minute (one every 10 s)
    buckets = _buckets(redis_client, settings)
    limit = Limit(Keys(settings.redis_prefix).team_bucket("alpha"), "team alpha", 6, None)

    # When 6 requests are taken, then one more
    takes = [await buckets.take([limit], 10) for _ in range(6)]
    refused = await buckets.take([limit], 10)

    # Expect the 6 admitted at once, and the next told to wait about 10 s
    assert takes == [Take(True, 0)] * 6
    assert not refused.taken
    assert 9000 <= refused.wait_ms <= 10_000


@pytest.mark.parametrize("holder", ["w/1", "w/2"], ids=["its owner's", "taken over"])
async def test_a_call_riding_with_a_take_runs_only_once_the_take_is_made(
    settings: Settings, redis_client: aioredis.Redis, holder: str
) -> None:
    # Given a deployment bucket of one request, and a job's claim held by its owner w/1 (or
    # taken over from it by w/2)
    buckets = _buckets(redis_client, settings)
    keys = Keys(settings.redis_prefix)
    limit = Limit(keys.deployment_bucket("d1"), "deployment d1", 1, None, 1)
    claim = keys.claim("alpha", "job-1")
    await redis_client.hset(claim, mapping={"owner": holder, "lease": "0"})
    owned = holder == "w/1"

    # When two takes each carry the record of a call in the claim
    def record(call: str) -> Call:
        return Call("hold", [claim], ["w/1", 60_000, call])

    first = await buckets.take([limit], 0, then=record('{"n": 1}'))
    second = await buckets.take([limit], 0, then=record('{"n": 2}'))

    # Expect the first taken with its call recorded, the second neither; taken over, the
    # record said not to have run (the owner records it on its own then, and finds the
    # claim another's: Claim.record stops the call)
    assert first == Take(True, 0, then_ran=owned)
    assert not second.taken and not second.then_ran
    assert await redis_client.hget(claim, "attempt") == (b'{"n": 1}' if owned else None)


async def test_a_take_takes_from_every_scope_or_from_none(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given a team with room for requests and a model scope with 100 tokens per minute
    buckets = _buckets(redis_client, settings)
    keys = Keys(settings.redis_prefix)
    team = Limit(keys.team_bucket("alpha"), "team alpha", 1000, None)
    model = Limit(keys.team_bucket("alpha", "m"), "team alpha on m", None, 100)

    # When a job takes 80 tokens, then another wants 80
    assert (await buckets.take([team, model], 80)).taken
    second = await buckets.take([team, model], 80)

    # Expect the second to wait for the model's tokens, and the team's request not taken
    assert not second.taken
    assert second.wait_ms > 30_000
    state = await redis_client.hget(team.key, "r")
    assert state is not None and float(state) == pytest.approx(999, abs=0.1)


async def test_settling_a_larger_usage_leaves_debt_and_a_smaller_one_refunds(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given a 600 tokens/minute bucket from which a job reserved 300
    buckets = _buckets(redis_client, settings)
    limit = Limit(Keys(settings.redis_prefix).team_bucket("alpha"), "team alpha", None, 600)
    assert (await buckets.take([limit], 300)).taken

    # When the job turns out to have used 900 (600 more than reserved)
    await _settle(redis_client, settings, limit, -600)

    # Expect the bucket in debt: even a 1-token job waits about 30 s
    in_debt = await buckets.take([limit], 1)
    assert not in_debt.taken
    assert 29_000 <= in_debt.wait_ms <= 30_200

    # And when 600 are refunded, the bucket admits again
    await _settle(redis_client, settings, limit, 600)
    assert await buckets.take([limit], 1) == Take(True, 0)


async def test_a_bucket_is_kept_until_it_would_be_full_again_whatever_settles_it(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given a 600 tokens/minute bucket from which a job took 300 (full again in 30 s)
    buckets = _buckets(redis_client, settings)
    limit = Limit(Keys(settings.redis_prefix).team_bucket("alpha"), "team alpha", None, 600)
    assert (await buckets.take([limit], 300)).taken

    # When the job gives 100 back, then another takes 100 into debt, then the bucket lapses
    # and a settle finds it missing
    await _settle(redis_client, settings, limit, 100)
    after_refund = await redis_client.pttl(limit.key)
    await _settle(redis_client, settings, limit, -400)
    after_debt = await redis_client.pttl(limit.key)
    await redis_client.delete(limit.key)
    await _settle(redis_client, settings, limit, 100)

    # Expect it kept at least until full each time (a missing bucket reads as full): 20 s
    # after the refund, 60 s in debt, and a ttl for the one the last settle made
    assert after_refund >= 20_000
    assert 60_000 <= after_debt <= 61_000
    assert await redis_client.pttl(limit.key) > 0


async def test_a_bucket_in_steady_use_is_kept_a_minute_not_renewed_on_every_take(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given a bucket of 600,000 tokens a minute (a take of 100 refills in 10 ms), taken once
    buckets = _buckets(redis_client, settings)
    limit = Limit(Keys(settings.redis_prefix).team_bucket("alpha"), "team alpha", None, 600_000)
    assert (await buckets.take([limit], 100)).taken
    first = await redis_client.pttl(limit.key)

    # When its ttl has partly run (set shorter here: as if 30 s had passed), a take that
    # needs less than what is left, then one that empties it (full again in a minute)
    await redis_client.pexpire(limit.key, 30_000)
    assert (await buckets.take([limit], 100)).taken
    after_small = await redis_client.pttl(limit.key)
    assert (await buckets.take([limit], 599_000)).taken
    after_large = await redis_client.pttl(limit.key)

    # Expect it kept a minute when set, not renewed by the small take (it still expires),
    # and renewed once a take needs longer than is left
    assert 59_000 <= first <= 60_000
    assert 0 < after_small <= 30_000
    assert 60_000 <= after_large <= 61_000


async def test_a_burst_admits_that_many_at_once_then_paces_at_the_rate(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given a deployment bucket of 600 requests per minute (one every 100 ms) holding 2
    buckets = _buckets(redis_client, settings)
    key = Keys(settings.redis_prefix).deployment_bucket("d")
    limit = Limit(key, "deployment d", 600, None, burst=2)

    # When 3 requests are taken at once
    takes = [await buckets.take([limit], 10) for _ in range(3)]

    # Expect 2 admitted, and the third told to wait for the refill, not a minute's worth
    assert takes[:2] == [Take(True, 0)] * 2
    assert not takes[2].taken
    assert 1 <= takes[2].wait_ms <= 100


async def test_a_take_within_a_wait_reserves_the_next_request_in_debt(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given an empty bucket of 600 requests per minute holding 1
    buckets = _buckets(redis_client, settings)
    limit = Limit(Keys(settings.redis_prefix).deployment_bucket("d"), "d", 600, None, burst=1)
    assert (await buckets.take([limit], 0)).taken

    # When a job willing to wait 1 s takes, then one that will not wait, then one that waits 50 ms
    reserved = await buckets.take([limit], 0, within_ms=1000)
    impatient = await buckets.take([limit], 0)
    too_soon = await buckets.take([limit], 0, within_ms=50)

    # Expect the first to hold the next request (about 100 ms away), and the others told to
    # wait behind it, about 200 ms, without taking anything
    assert reserved.taken and 1 <= reserved.wait_ms <= 100
    assert not impatient.taken and 100 < impatient.wait_ms <= 200
    assert not too_soon.taken and too_soon.wait_ms > 100


async def test_draining_empties_the_requests_and_keeps_the_tokens(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given a deployment bucket of 600 requests per minute holding 10, and 600 tokens
    buckets = _buckets(redis_client, settings)
    key = Keys(settings.redis_prefix).deployment_bucket("d")
    limit = Limit(key, "deployment d", 600, 600, burst=10)
    assert (await buckets.take([limit], 100)).taken

    # When the provider answers 429 and the bucket is drained
    await buckets.drain([limit])

    # Expect the next request to wait for the refill (100 ms), its tokens still there
    after = await buckets.take([limit], 100)
    assert not after.taken and 1 <= after.wait_ms <= 100
    state = await redis_client.hget(key, "t")
    assert state is not None and float(state) == pytest.approx(500, abs=1)


def test_fail_open_local_buckets_keep_a_share_of_the_burst_and_reserve_alike() -> None:
    # Given one of two workers' local buckets, for 600 requests per minute holding 4
    local = LocalBuckets(share=1 / 2)
    limit = Limit("d", "deployment d", 600, None, burst=4)

    # When 3 requests are taken at once, then one willing to wait a second
    takes = [local.take([limit], 0) for _ in range(3)]
    reserved = local.take([limit], 0, within_ms=1000)

    # Expect its half: 2 at once, then one every 200 ms, the next reserved
    assert [t.taken for t in takes] == [True, True, False]
    assert 190 <= takes[2].wait_ms <= 200
    assert reserved.taken and 190 <= reserved.wait_ms <= 200
    # and a share of a one-request burst still admits one request at a time
    assert LocalBuckets(share=1 / 8).take([Limit("e", "e", 60, None, burst=1)], 0).taken


async def test_a_job_larger_than_a_minute_of_the_limit_is_refused_at_once(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given a 100 tokens/minute bucket
    limit = Limit(Keys(settings.redis_prefix).team_bucket("alpha"), "team alpha", None, 100)

    # When a job needs 101 tokens, expect a clear error rather than an endless wait
    with pytest.raises(InvalidRequest, match="more than team alpha admits in a minute"):
        await _buckets(redis_client, settings).take([limit], 101)


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


async def test_a_take_whose_reply_was_lost_is_sent_again_and_taken_once(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given a bucket of 10 requests (10 a minute), reached through a proxy
    key = Keys(settings.redis_prefix).team_bucket("alpha")
    limit = Limit(key, "team alpha", 10, None)
    async with TcpProxy(settings.redis_url) as proxy:
        client = redis_for(settings.model_copy(update={"redis_url": proxy.url}))
        try:
            buckets = _buckets(client, settings)
            assert await buckets.take([limit], 1) == Take(True, 0)
            # When a take reaches Redis, runs, and its connection breaks before the reply
            proxy.lose_reply(b"EVALSHA")
            second = await buckets.take([limit], 1)
        finally:
            await client.aclose()

    # Expect the client to have sent it again and got its reply, and the bucket to hold
    # the 8 requests left after two takes (plus what it refilled meanwhile), not 7
    assert proxy.replies_lost == 1
    assert second == Take(True, 0)
    left = float(await redis_client.hget(key, "r") or 0)
    assert 8 <= left < 8.5


def _shared(settings: Settings) -> Limit:
    """A deployment's bucket, shared by teams: one request a second, one at a time."""
    keys = Keys(settings.redis_prefix)
    return Limit(
        keys.deployment_bucket("d"), "deployment d", 60, None, 1, line=keys.deployment_line("d")
    )


async def test_teams_take_a_shared_bucket_in_the_order_they_started_waiting(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given a shared bucket that alpha just emptied, then beta and alpha waiting for it
    buckets = _buckets(redis_client, settings)
    limit = _shared(settings)
    assert (await buckets.take([limit], 0, team="alpha")).taken
    assert not await redis_client.exists(str(limit.line))  # nobody waited: nothing written
    beta = await buckets.take([limit], 0, team="beta", patience_ms=10_000)
    alpha = await buckets.take([limit], 0, team="alpha", patience_ms=10_000)
    assert not beta.taken and not alpha.taken

    # When the bucket has a request again, and alpha asks first
    await _settle(redis_client, settings, limit, 0, requests_back=1)
    early = await buckets.take([limit], 0, team="alpha", patience_ms=10_000)

    # Expect alpha refused, told to ask again shortly (beta's turn), and beta served
    assert early == Take(False, 50)
    assert (await buckets.take([limit], 0, team="beta", patience_ms=10_000)).taken
    # then alpha in its turn, leaving the line empty (beta served left it)
    await _settle(redis_client, settings, limit, 0, requests_back=1)
    assert (await buckets.take([limit], 0, team="alpha", patience_ms=10_000)).taken
    assert not await redis_client.exists(str(limit.line))


async def test_a_team_whose_waiter_stops_asking_loses_its_turn_soon_after_its_wait(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given a shared bucket that alpha emptied, and beta entered in line (told ~1 s)
    buckets = _buckets(redis_client, settings)
    limit = _shared(settings)
    line = str(limit.line)
    await buckets.take([limit], 0, team="alpha")
    told = await buckets.take([limit], 0, team="beta", patience_ms=10_000)
    since, alive = map(int, (await redis_client.hget(line, "beta") or b"").split())
    await _settle(redis_client, settings, limit, 0, requests_back=1)
    assert not (await buckets.take([limit], 0, team="alpha", patience_ms=10_000)).taken

    # When beta's worker dies, never asking again, and its entry's time passes
    assert alive - since <= (told.wait_ms + 1000) * 1000  # its wait and 1 s, no more
    await redis_client.hset(line, "beta", f"{since} {since + 1}")

    # Expect alpha served, and beta's entry gone
    assert (await buckets.take([limit], 0, team="alpha", patience_ms=10_000)).taken
    assert await redis_client.hget(line, "beta") is None


async def test_a_team_that_will_not_wait_long_enough_takes_no_place_in_line(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given a shared bucket that alpha emptied (a second to the next request)
    buckets = _buckets(redis_client, settings)
    limit = _shared(settings)
    await buckets.take([limit], 0, team="alpha")

    # When beta asks, willing to wait 0.5 s
    refused = await buckets.take([limit], 0, team="beta", patience_ms=500)

    # Expect it refused and not entered: it would hold the bucket for a call never made
    assert not refused.taken and refused.wait_ms > 500
    assert not await redis_client.exists(str(limit.line))


async def test_a_reservation_is_due_sooner_by_what_settles_give_back_while_it_waits(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given a team bucket of 600 tokens a minute (10 a second) emptied by one job's take,
    # and a job of 300 tokens reserved behind it, told to wait 30 s
    buckets, limit, reserved = await _reserved_behind(settings, redis_client)
    assert 29_000 <= reserved.wait_ms <= 30_000

    # When the first job settles having used 400 tokens (200 back), then another 200 more
    due = await buckets.due([limit], reserved.marks)
    await _settle(redis_client, settings, limit, 200)
    sooner = await buckets.due([limit], reserved.marks)
    await _settle(redis_client, settings, limit, 200)
    paid = await buckets.due([limit], reserved.marks)

    # Expect the reservation due as its take said, then 20 s sooner, then at once, the
    # bucket out of debt
    assert 28_000 <= due <= reserved.wait_ms
    assert due - 21_000 <= sooner <= due - 19_000
    assert paid == 0
    assert float(await redis_client.hget(limit.key, "t") or 0) >= 0


async def test_a_job_that_used_more_than_it_took_offsets_refunds_to_a_reservation(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given a team bucket of 600 tokens a minute emptied by one job's take, and a job of 300
    # tokens reserved behind it, told to wait 30 s
    buckets, limit, reserved = await _reserved_behind(settings, redis_client)
    due = await buckets.due([limit], reserved.marks)

    # When one job settles 200 tokens back and another 200 more than it took, the bucket
    # as deep in debt as at the reservation
    await _settle(redis_client, settings, limit, 200)
    await _settle(redis_client, settings, limit, -200)
    after = await buckets.due([limit], reserved.marks)

    # Expect the reservation due no sooner than the refill alone makes it: the refund was
    # spent by the overuse, not free for the job waiting
    assert after >= due - 1_000


async def test_a_reservation_given_up_behind_another_does_not_pay_its_debt(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given a team bucket of 600 tokens a minute emptied by one job's take, a job of 300
    # tokens reserved behind it, and another of 300 reserved behind that one
    buckets, limit, first = await _reserved_behind(settings, redis_client)
    second = await buckets.take([limit], 300, within_ms=120_000)
    assert first.marks and second.marks and second.wait_ms > first.wait_ms
    due = await buckets.due([limit], first.marks)

    # When the second gives its reservation up (its worker drains: no call made), its
    # request and its 300 tokens back
    await _settle(redis_client, settings, limit, 300, requests_back=1)

    # Expect the first due no sooner: those tokens were never part of its debt (it would
    # have gone 30 s early, its tokens not there)
    assert await buckets.due([limit], first.marks) >= due - 1_000
