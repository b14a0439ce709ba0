"""Async jobs, long polls and idempotency through the front door: an answer is read back by
id from the workers' outcome store, by its own team only, and a retry is never a second
call."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anthropic
import httpx
import openai
import pytest
import redis.asyncio as aioredis

from frontdoor.outcomes import stored_by
from mockprovider import Behavior, MockConfig
from queuegate.keys import Keys
from queuegate.settings import Settings
from queuegate.topology import Topology
from tests.chaos.harness import worker_env, workers_running
from tests.frontdoor_support import HELLO, Door, open_door
from tests.support import consumers, depth, running_gateway

SLOW = MockConfig(models={"flaky-gpt": Behavior(latency_ms=600)})
BODY = {"model": "gpt-4o-mini", "messages": HELLO}
QUICK = {"job_time_limit": 0.5, "claim_lease": 0.5, "teams_refresh": 0.5}
"""A job's outcome, if any, is stored 1.5 s past its deadline at the latest: a worker on it
spends 0.5 s at most, a dead one's claim lapses 0.5 s later, and a sweep comes each 0.5 s."""


@pytest.fixture
async def door(settings: Settings) -> AsyncIterator[Door]:
    async with open_door(settings, mock_config=SLOW) as opened:
        yield opened


def auth(door: Door, team: str = "alpha", **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {door.keys[team]}", **headers}


async def test_respond_async_answers_202_and_the_job_is_read_back_by_id(door: Door) -> None:
    async with httpx.AsyncClient(base_url=door.url, timeout=30) as http:
        accepted = await http.post(
            "/v1/chat/completions",
            json={**BODY, "model": "flaky-gpt"},
            headers=auth(door, prefer="respond-async"),
        )
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["id"]
        assert accepted.headers["location"] == f"/v1/jobs/{job_id}"
        # Not finished yet: 202 again at once
        pending = await http.get(f"/v1/jobs/{job_id}", headers=auth(door))
        assert pending.status_code == 202 and pending.json()["status"] == "queued"
        # Long-polled until it is
        done = await http.get(f"/v1/jobs/{job_id}", params={"wait": 10}, headers=auth(door))
        assert done.status_code == 200, done.text
        assert done.json()["choices"][0]["message"]["content"]
        assert done.json()["_gateway"]["request_id"] == job_id
        assert done.json()["id"] == f"chatcmpl-{job_id}"
        # Another team reads nothing of it, and an unknown id is 404
        other = await http.get(f"/v1/jobs/{job_id}", headers=auth(door, "beta"))
        unknown = await http.get("/v1/jobs/no-such-job", headers=auth(door))
    assert other.status_code == unknown.status_code == 404
    assert other.json()["error"]["code"] == "not_found"


async def test_a_retry_under_the_same_idempotency_key_is_answered_once(door: Door) -> None:
    key = {"Idempotency-Key": "order-42"}
    async with door.client() as client:
        first = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=HELLO, extra_headers=key
        )
        again = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=HELLO, extra_headers=key
        )
        # A different request under the same key is refused, never answered with the first
        with pytest.raises(openai.UnprocessableEntityError) as conflict:
            await client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "other"}],
                extra_headers=key,
            )
        # The same key of another team is another job
        async with door.client("beta") as beta:
            theirs = await beta.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=HELLO, extra_headers=key
            )
    assert first.parse().choices[0].message.content == again.parse().choices[0].message.content
    assert first.headers["x-queuegate-job-id"] == again.headers["x-queuegate-job-id"]
    assert conflict.value.code == "idempotency_conflict"
    assert theirs.headers["x-queuegate-job-id"] != first.headers["x-queuegate-job-id"]
    assert door.gateway.mock.stats.calls == 2  # alpha's once, beta's once
    rows = await door.gateway.usage_rows(2)
    assert sorted(row["team"] for row in rows) == ["alpha", "beta"]


async def test_two_teams_using_one_idempotency_key_at_once_each_get_their_own_answer(
    door: Door,
) -> None:
    # Replies reach a front-door process by job id, whatever the team: the key must not be
    # the whole id, or one team would wait on (and be handed) the other's answer.
    key = {"Idempotency-Key": "shared-key"}

    async def ask(team: str) -> str:
        async with door.client(team) as client:
            answer = await client.chat.completions.create(
                model="flaky-gpt",
                messages=[{"role": "user", "content": f"I am {team}"}],
                extra_headers=key,
            )
        return answer.choices[0].message.content or ""

    alpha, beta = await asyncio.gather(ask("alpha"), ask("beta"))
    assert "I am alpha" in alpha and "I am beta" in beta
    assert door.gateway.mock.stats.calls == 2


async def test_a_caller_that_hung_up_gets_its_answer_by_retrying_with_its_key(
    door: Door,
) -> None:
    # Given a caller that gives up (its HTTP timeout) while the gateway still works on it
    key = {"Idempotency-Key": "hung-up", "x-queuegate-timeout": "30"}
    async with door.client(timeout=0.2) as impatient:
        with pytest.raises(openai.APITimeoutError):
            await impatient.chat.completions.create(
                model="flaky-gpt", messages=HELLO, extra_headers=key
            )
    # When it retries with the same key, at once and again after the answer was stored
    async with door.client() as client:
        during = client.chat.completions.create(
            model="flaky-gpt", messages=HELLO, extra_headers=key
        )
        answers = [await during]
        answers.append(
            await client.chat.completions.create(
                model="flaky-gpt", messages=HELLO, extra_headers=key
            )
        )
    # Expect the one answer each time, from one provider call
    assert len({answer.choices[0].message.content for answer in answers}) == 1
    assert door.gateway.mock.stats.calls == 1
    [row] = await door.gateway.usage_rows(1)
    assert row["model_requested"] == "flaky-gpt"


async def test_a_job_of_v1_messages_is_read_back_as_the_message_it_answered(door: Door) -> None:
    # Given a message answered through /v1/messages
    claude = anthropic.AsyncAnthropic(base_url=door.url, api_key=door.keys["alpha"], max_retries=0)
    async with claude, httpx.AsyncClient(base_url=door.url, timeout=30) as http:
        created = await claude.messages.with_raw_response.create(
            model="gpt-4o-mini",
            max_tokens=50,
            messages=HELLO,  # type: ignore[arg-type]
        )
        job_id = created.headers["x-queuegate-job-id"]
        # When its job is read by id, as a caller that lost its answer reads it
        read = await http.get(f"/v1/jobs/{job_id}", headers=auth(door))
    # Expect the message /v1/messages answered, the gateway's block beside it
    assert read.status_code == 200, read.text
    body = read.json()
    assert body.pop("_gateway")["request_id"] == job_id
    assert body == created.http_response.json()
    assert body["type"] == "message" and body["id"] == f"msg_{job_id}"


async def test_a_failed_job_of_v1_messages_is_read_back_in_anthropics_error_shape(
    settings: Settings,
) -> None:
    # Given a message its provider refused, and a chat completion refused alike
    refusing = MockConfig(models={"gpt-4o-mini": Behavior(error_rate=1.0, error_status=400)})
    async with open_door(settings, mock_config=refusing) as door:
        claude = anthropic.AsyncAnthropic(
            base_url=door.url, api_key=door.keys["alpha"], max_retries=0
        )
        async with claude, door.client() as client, httpx.AsyncClient(base_url=door.url) as http:
            with pytest.raises(anthropic.BadRequestError) as refused:
                await claude.messages.create(
                    model="gpt-4o-mini",
                    max_tokens=50,
                    messages=HELLO,  # type: ignore[arg-type]
                )
            with pytest.raises(openai.BadRequestError) as refused_too:
                await client.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=HELLO,  # type: ignore[arg-type]
                )
            # When each job is read by id
            ids = [e.value.response.headers["x-queuegate-job-id"] for e in (refused, refused_too)]
            read = [await http.get(f"/v1/jobs/{i}", headers=auth(door)) for i in ids]
    # Expect each error as its own route answered it, in that API's shape
    assert [r.status_code for r in read] == [400, 400]
    assert read[0].json() == refused.value.response.json()
    assert read[0].json()["type"] == "error"
    assert read[1].json() == refused_too.value.response.json()
    assert read[1].json()["error"]["code"] == "invalid_request"


async def test_an_async_retry_of_an_answered_job_gets_its_answer_never_queued(door: Door) -> None:
    # Given an async request under an Idempotency-Key, its answer read by id
    headers = {**auth(door, prefer="respond-async"), "Idempotency-Key": "nightly-1"}
    async with httpx.AsyncClient(base_url=door.url, timeout=30) as http:
        first = await http.post("/v1/chat/completions", json=BODY, headers=headers)
        job_id = first.json()["id"]
        polled = await http.get(f"/v1/jobs/{job_id}", params={"wait": 10}, headers=auth(door))
        # When it is sent again, as a client unsure it was taken sends it
        again = await http.post("/v1/chat/completions", json=BODY, headers=headers)
    # Expect the answer as the poll read it, where it is read, not a 202 saying "queued"
    assert first.status_code == 202 and polled.status_code == 200, polled.text
    assert again.status_code == 200, again.text
    assert again.json() == polled.json()
    assert again.headers["content-location"] == f"/v1/jobs/{job_id}"
    assert door.gateway.mock.stats.calls == 1


async def test_v1_messages_answers_respond_async_and_its_job_is_read_as_a_message(
    door: Door,
) -> None:
    # Given a /v1/messages request that prefers to be answered later, and no timeout named
    body = {"model": "flaky-gpt", "max_tokens": 50, "messages": HELLO}
    async with httpx.AsyncClient(base_url=door.url, timeout=30) as http:
        accepted = await http.post(
            "/v1/messages",
            json=body,
            headers={"x-api-key": door.keys["alpha"], "prefer": "respond-async"},
        )
        # When its job is read by id once done
        job_id = accepted.json()["id"]
        done = await http.get(f"/v1/jobs/{job_id}", params={"wait": 10}, headers=auth(door))
    # Expect 202 at once, as a chat completion is answered (not the message, waited for),
    # and the message read by id
    assert accepted.status_code == 202, accepted.text
    assert accepted.headers["location"] == f"/v1/jobs/{job_id}"
    assert done.status_code == 200, done.text
    assert done.json()["type"] == "message" and done.json()["id"] == f"msg_{job_id}"


async def test_an_async_job_expired_in_its_queue_is_read_as_deadline_exceeded(
    settings: Settings,
) -> None:
    # Given async jobs with a 1 s deadline, a chat completion and a message, and one without
    # a deadline, published while no worker takes any job
    async with open_door(settings.model_copy(update=QUICK)) as door:
        await door.gateway.stop_worker()
        later = auth(door, prefer="respond-async")
        due = {**later, "x-queuegate-timeout": "1"}
        message = {"model": "gpt-4o-mini", "max_tokens": 50, "messages": HELLO}
        async with httpx.AsyncClient(base_url=door.url, timeout=30) as http:
            accepted = [
                await http.post("/v1/chat/completions", json=BODY, headers=due),
                await http.post("/v1/messages", json=message, headers=due),
                await http.post("/v1/chat/completions", json=BODY, headers=later),
            ]
            chat, messages, undated = [a.json()["id"] for a in accepted]
            queued = await http.get(f"/v1/jobs/{chat}", headers=auth(door))
            # When the dated ones are long-polled past their deadline and the time a worker
            # could still answer them, and the undated one read then
            began = time.monotonic()
            read = await asyncio.gather(
                *(
                    http.get(f"/v1/jobs/{i}", params={"wait": 20}, headers=auth(door))
                    for i in (chat, messages)
                )
            )
            waited = time.monotonic() - began
            still = await http.get(f"/v1/jobs/{undated}", headers=auth(door))
    # Expect each dated job's error in its route's shape, not retried, once that time came
    # rather than at the wait's end; the undated one queued
    assert [a.status_code for a in accepted] == [202, 202, 202]
    assert queued.status_code == 202 and queued.json()["status"] == "queued"
    assert [r.status_code for r in read] == [504, 504], [r.text for r in read]
    assert all(r.headers["x-should-retry"] == "false" for r in read)
    error = read[0].json()["error"]
    assert error["code"] == "deadline_exceeded"
    assert "expired in its queue" in error["message"] and "nothing was billed" in error["message"]
    assert read[1].json()["type"] == "error"
    assert read[1].json()["error"]["type"] == "timeout_error"
    assert read[1].json()["error"]["message"].startswith("deadline_exceeded: job ")
    assert waited < 10
    assert still.status_code == 202 and still.json()["status"] == "queued"


async def test_a_job_expired_in_its_queue_is_published_again_by_a_retry_under_its_key(
    settings: Settings,
) -> None:
    # Given an async job under an Idempotency-Key that expired in its queue, no worker there
    quick = settings.model_copy(update=QUICK)
    key = {"Idempotency-Key": "expired-1"}
    async with open_door(quick) as door:
        await door.gateway.stop_worker()
        due = auth(door, prefer="respond-async", **{"x-queuegate-timeout": "1"}, **key)
        async with httpx.AsyncClient(base_url=door.url, timeout=30) as http:
            first = await http.post("/v1/chat/completions", json=BODY, headers=due)
            job_id = first.json()["id"]
            expired = await http.get(f"/v1/jobs/{job_id}", params={"wait": 20}, headers=auth(door))
            # When it is sent again under its key, a worker serving its team once more
            async with running_gateway(quick, teams=["alpha", "beta"]) as again:
                retried = await http.post(
                    "/v1/chat/completions", json=BODY, headers=auth(door, **key)
                )
                read = await http.get(f"/v1/jobs/{job_id}", headers=auth(door))
    # Expect it published again and answered, once, the same job read so since
    assert expired.status_code == 504, expired.text
    assert retried.status_code == 200, retried.text
    assert retried.headers["x-queuegate-job-id"] == job_id
    assert read.status_code == 200 and read.json()["_gateway"]["request_id"] == job_id
    assert again.mock.stats.calls == 1


async def test_an_async_job_whose_worker_died_in_its_call_reads_queued_until_a_sweep_bills_it(
    settings: Settings,
) -> None:
    # Given an async job due in 6 s whose worker process is SIGKILLed while the provider
    # holds its call, and no worker running after it
    bounds = {"job_time_limit": 2.0, "claim_lease": 0.5, "teams_refresh": 0.5}
    quick = settings.model_copy(update=bounds)
    hanging = MockConfig(default=Behavior(timeout_rate=1, hang_s=300))
    async with open_door(quick, mock_config=hanging) as door:
        await door.gateway.stop_worker()
        mock = door.gateway.mock
        env = worker_env(
            quick, mock, **{f"QUEUEGATE_{k.upper()}": str(v) for k, v in bounds.items()}
        )
        due = auth(door, prefer="respond-async", **{"x-queuegate-timeout": "6"})
        async with httpx.AsyncClient(base_url=door.url, timeout=30) as http:
            async with workers_running(env, ("alpha",)) as [worker]:
                accepted = await http.post("/v1/chat/completions", json=BODY, headers=due)
                submitted = time.monotonic()
                async with asyncio.timeout(20):
                    await mock.wait_for_calls(1)
                worker.send_signal(signal.SIGKILL)
                await worker.wait()
            job_id = accepted.json()["id"]
            # When it is read by id past its deadline and the time a live worker could
            # still answer it (2 s + 0.5 s + 2 x 0.5 s), then once a worker runs again
            past = 6 + stored_by(quick) + 1 - (time.monotonic() - submitted)
            while_dead = await http.get(
                f"/v1/jobs/{job_id}", params={"wait": past}, headers=auth(door)
            )
            async with workers_running(env, ("alpha",)):
                swept = await http.get(
                    f"/v1/jobs/{job_id}", params={"wait": 30}, headers=auth(door)
                )
                rows = await door.gateway.usage_rows(1, timeout=30)
    # Expect it queued while no worker could bill the call its dead worker made (not "expired
    # uncalled: nothing was billed"), then answered deadline_exceeded with that call billed
    assert accepted.status_code == 202, accepted.text
    assert while_dead.status_code == 202, while_dead.text
    assert while_dead.json()["status"] == "queued"
    assert swept.status_code == 504, swept.text
    assert swept.json()["error"]["code"] == "deadline_exceeded"
    assert "nothing was billed" not in swept.json()["error"]["message"]
    assert [(r["job_id"], r["error_code"]) for r in rows] == [(job_id, "deadline_exceeded")]
    assert [a["error"] for a in rows[0]["attempt_log"]] == ["lost"]
    assert rows[0]["cost_usd"] > 0
    assert mock.stats.calls == 1


async def test_a_job_an_earlier_front_door_accepted_reads_as_queued(
    door: Door, redis_client: aioredis.Redis, settings: Settings
) -> None:
    # Given jobs accepted by front doors that kept no deadline: b"1", then the format alone
    keys = Keys(settings.redis_prefix)
    for job_id, marker in (("before-formats", b"1"), ("before-deadlines", b"anthropic")):
        await redis_client.set(keys.accepted("alpha", job_id), marker, ex=60)
    # When each is read by id
    async with httpx.AsyncClient(base_url=door.url, timeout=30) as http:
        read = [
            await http.get(f"/v1/jobs/{i}", headers=auth(door))
            for i in ("before-formats", "before-deadlines")
        ]
    # Expect each queued, as it was
    assert [(r.status_code, r.json()["status"]) for r in read] == [(202, "queued")] * 2


@dataclass
class LateJob:
    """An async job under an Idempotency-Key, due in 1 s, held by a stopped worker past its
    deadline (``late_job``)."""

    door: Door
    worker: asyncio.subprocess.Process
    client: openai.AsyncOpenAI
    http: httpx.AsyncClient
    job_id: str


@contextlib.asynccontextmanager
async def late_job(settings: Settings, key: dict[str, str]) -> AsyncIterator[LateJob]:
    """An async job under ``key``, due in 1 s, delivered to a worker process stopped
    (SIGSTOP) until its deadline passed; the worker is left stopped."""
    async with open_door(settings) as door:
        await door.gateway.stop_worker()
        team_queue = Topology(settings.namespace).team_queue("alpha")
        async with (
            workers_running(worker_env(settings, door.gateway.mock), ("alpha",)) as [worker],
            door.client() as client,
            httpx.AsyncClient(base_url=door.url, timeout=30) as http,
        ):
            await consumers(settings, ["alpha"], 1)
            worker.send_signal(signal.SIGSTOP)
            first = await client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini",
                messages=HELLO,
                extra_headers={"prefer": "respond-async", "x-queuegate-timeout": "1", **key},
            )
            assert first.status_code == 202
            due = time.monotonic() + 1
            # Polled: the broker announces no delivery
            while await depth(settings, team_queue):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
            await asyncio.sleep(due - time.monotonic() + 0.1)  # the deadline, a time alone
            yield LateJob(door, worker, client, http, first.headers["x-queuegate-job-id"])


async def test_a_job_a_worker_refused_late_uncalled_is_published_again_by_a_retry_under_its_key(
    settings: Settings,
) -> None:
    # Given an async job under an Idempotency-Key, due in 1 s, delivered to a worker process
    # that is stopped (SIGSTOP) until its deadline passed, then taken and refused uncalled
    key = {"Idempotency-Key": "refused-late"}
    async with late_job(settings, key) as late:
        door, client, job_id = late.door, late.client, late.job_id
        late.worker.send_signal(signal.SIGCONT)
        [refusal] = await door.gateway.usage_rows(1, timeout=30)
        refused = await late.http.get(f"/v1/jobs/{job_id}", headers=auth(door))
        # When it is sent again under its key with a longer deadline, twice at once
        retried = await asyncio.gather(
            *(
                client.chat.completions.with_raw_response.create(
                    model="gpt-4o-mini",
                    messages=HELLO,
                    extra_headers={"x-queuegate-timeout": "30", **key},
                )
                for _ in range(2)
            )
        )
        read = await late.http.get(f"/v1/jobs/{job_id}", headers=auth(door))
        rows = await door.gateway.usage_rows(2, timeout=30)
    # Expect the late refusal uncalled and unbilled, then the job published again and
    # answered to both retries from one call, billed on a row of its own, and read so since
    assert (refusal["error_code"], refusal["attempts"], refusal["cost_usd"]) == (
        "deadline_exceeded",
        0,
        0,
    )
    assert refused.status_code == 504, refused.text
    assert "passed before the job was served" in refused.json()["error"]["message"]
    assert [r.status_code for r in retried] == [200, 200]
    assert [r.headers["x-queuegate-job-id"] for r in retried] == [job_id, job_id]
    assert len({r.parse().choices[0].message.content for r in retried}) == 1
    assert read.status_code == 200 and read.json()["_gateway"]["request_id"] == job_id
    assert door.gateway.mock.stats.calls == 1
    assert sorted((r["error_code"], r["attempts"]) for r in rows if r["job_id"] != job_id) == [
        (None, 1)
    ]


async def test_a_retry_waiting_for_a_job_published_again_is_not_answered_its_late_refusal(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given an async job under an Idempotency-Key, due in 1 s, delivered to a worker process
    # that is stopped (SIGSTOP) past its deadline
    key = {"Idempotency-Key": "refused-while-retried"}
    async with late_job(settings, key) as late:
        door, job_id = late.door, late.job_id
        accepted = Keys(settings.redis_prefix).accepted("alpha", job_id)
        marker = await redis_client.get(accepted)
        # When it is sent again under its key, waited for (not async), due in 30 s, and
        # the worker goes on once that is published: it refuses the first delivery late
        retry = asyncio.create_task(
            late.client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini",
                messages=HELLO,
                extra_headers={"x-queuegate-timeout": "30", **key},
            )
        )
        # Polled: nothing announces the publish (its accepted marker is written first)
        while await redis_client.get(accepted) == marker:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        late.worker.send_signal(signal.SIGCONT)
        retried = await retry
        rows = await door.gateway.usage_rows(2, timeout=30)
        read = await late.http.get(f"/v1/jobs/{job_id}", headers=auth(door))
    # Expect the retry answered by the job's one call, not by the first delivery's refusal
    # (uncalled, unbilled), and the job read so since
    assert retried.status_code == 200, retried.text
    assert retried.headers["x-queuegate-job-id"] == job_id
    assert retried.parse().choices[0].message.content
    assert door.gateway.mock.stats.calls == 1
    assert sorted((r["error_code"] or "", r["attempts"], r["cost_usd"]) for r in rows) == [
        ("", 1, rows[0]["cost_usd"] or rows[1]["cost_usd"]),
        ("deadline_exceeded", 0, 0),
    ]
    assert read.status_code == 200 and read.json()["_gateway"]["request_id"] == job_id


async def test_a_job_that_ended_past_its_deadline_after_a_call_is_not_called_again(
    settings: Settings,
) -> None:
    # Given a job under an Idempotency-Key, due in 1 s, whose provider call outlasts it
    key = {"Idempotency-Key": "called-late", "x-queuegate-timeout": "1"}
    slow = MockConfig(default=Behavior(latency_ms=3000))
    async with open_door(settings, mock_config=slow) as door, door.client() as client:
        with pytest.raises(openai.InternalServerError) as late:
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=HELLO, extra_headers=key
            )
        [row] = await door.gateway.usage_rows(1, timeout=30)
        # When it is sent again under its key with a longer deadline
        with pytest.raises(openai.InternalServerError) as again:
            await client.chat.completions.create(
                model="gpt-4o-mini",
                messages=HELLO,
                extra_headers={**key, "x-queuegate-timeout": "30"},
            )
    # Expect its stored deadline_exceeded at once, its one call (cut at the deadline, so the
    # mock counts no answer) never made again: made again, it would be answered
    assert late.value.status_code == again.value.status_code == 504
    assert (row["error_code"], row["attempts"]) == ("deadline_exceeded", 1)
    assert again.value.code == "deadline_exceeded"
    assert door.gateway.mock.stats.calls == 0
