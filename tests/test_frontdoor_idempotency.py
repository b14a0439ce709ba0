"""One Idempotency-Key, many requests at once through the front door: the key is bound to
the first request's fingerprint before anything is published, so a different request is
refused at once and never reaches (or spoils) the first one's answer, and every caller of
the same request gets that answer, streamed or not."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aio_pika
import httpx
import openai
import pytest
import redis.asyncio as aioredis
from opentelemetry.sdk.trace import TracerProvider

from frontdoor.auth import Caller
from frontdoor.bridge import Bridge
from frontdoor.chat_request import RequestOptions
from mockprovider import Behavior, MockConfig
from producer.replies import Inbox
from producer.streams import ChatStream
from queuegate import tracing
from queuegate.broker import consume
from queuegate.keys import Keys
from queuegate.messages import ChatJob, ChatResult, GatewayInfo, StreamChunk
from queuegate.settings import Settings
from queuegate.topology import MESSAGE_TYPE_CHUNK, MESSAGE_TYPE_RESULT
from tests.frontdoor_support import Door, open_door

SLOW = MockConfig(models={"flaky-gpt": Behavior(latency_ms=2000)})
KEY = "order-7"


@pytest.fixture
async def door(settings: Settings) -> AsyncIterator[Door]:
    async with open_door(settings, mock_config=SLOW) as opened:
        yield opened


def said(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def job_id(team: str, key: str = KEY) -> str:
    options = RequestOptions(
        timeout=60, timeout_named=False, idempotency_key=key, respond_async=False
    )
    return options.job_id(team)


async def claimed(settings: Settings, redis_client: aioredis.Redis, team: str) -> None:
    """Wait until a worker holds the job of ``KEY``: its provider call is under way."""
    claim = Keys(settings.redis_prefix).claim(team, job_id(team))
    async with asyncio.timeout(10):
        # Polled: nothing announces a claim taken in Redis.
        while not await redis_client.hexists(claim, "owner"):  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_a_different_request_under_a_key_in_use_is_refused_at_once_and_spoils_nothing(
    door: Door, settings: Settings, redis_client: aioredis.Redis
) -> None:
    headers = {"Idempotency-Key": KEY}
    async with door.client() as client:
        # Given "first" under the key, its provider call under way
        first = asyncio.create_task(
            client.chat.completions.create(
                model="flaky-gpt", messages=said("first"), extra_headers=headers
            )
        )
        await claimed(settings, redis_client, "alpha")

        # When twenty different requests come under the same key meanwhile
        async def other(n: int) -> openai.UnprocessableEntityError:
            with pytest.raises(openai.UnprocessableEntityError) as refused:
                await client.chat.completions.create(
                    model="flaky-gpt", messages=said(f"second {n}"), extra_headers=headers
                )
            return refused.value

        refusals = await asyncio.gather(*(other(n) for n in range(20)))
        # Expect each refused while "first" is still being served, never published
        assert not first.done()
        answer = await first
        # and "first" answered its own reply, from one call, billed once
        again = await client.chat.completions.create(
            model="flaky-gpt", messages=said("first"), extra_headers=headers
        )
    assert {r.code for r in refusals} == {"idempotency_conflict"}
    assert answer.choices[0].message.content == "mock reply to: first"
    assert again.choices[0].message.content == "mock reply to: first"
    assert door.gateway.mock.stats.calls == 1
    [row] = await door.gateway.usage_rows(1)
    assert row["status"] == "ok" and row["job_id"] == job_id("alpha")


async def test_an_async_request_under_a_used_key_is_refused_if_it_differs(door: Door) -> None:
    auth = {"Authorization": f"Bearer {door.keys['alpha']}", "Idempotency-Key": KEY}
    async_ = {**auth, "Prefer": "respond-async"}
    async with httpx.AsyncClient(base_url=door.url, timeout=30) as http:
        one = await http.post(
            "/v1/chat/completions",
            json={"model": "gpt-4o-mini", "messages": said("one")},
            headers=async_,
        )
        two = await http.post(
            "/v1/chat/completions",
            json={"model": "gpt-4o-mini", "messages": said("two")},
            headers=async_,
        )
        done = await http.get(f"/v1/jobs/{one.json()['id']}", params={"wait": 10}, headers=auth)
        # The same request again, once answered: the same job, not published again
        repeated = await http.post(
            "/v1/chat/completions",
            json={"model": "gpt-4o-mini", "messages": said("one")},
            headers=async_,
        )
    assert one.status_code == 202, one.text
    assert two.status_code == 422, two.text
    assert two.json()["error"]["code"] == "idempotency_conflict"
    assert done.status_code == 200, done.text
    assert done.json()["choices"][0]["message"]["content"] == "mock reply to: one"
    assert repeated.status_code == 200, repeated.text
    assert repeated.headers["x-queuegate-job-id"] == one.json()["id"]
    assert door.gateway.mock.stats.calls == 1


async def test_every_retry_of_an_answered_key_names_the_trace_of_its_job(
    settings: Settings,
) -> None:
    # Given the front door tracing, and a request answered under an Idempotency-Key
    provider = TracerProvider()
    tracing.install(provider)
    headers = {"Idempotency-Key": KEY}
    try:
        async with open_door(settings) as door, door.client() as client:
            create = client.chat.completions.with_raw_response.create
            first = await create(model="gpt-4o-mini", messages=said("one"), extra_headers=headers)
            # When it is sent again, plain, streamed, and to be answered later (respond-async)
            plain = await create(model="gpt-4o-mini", messages=said("one"), extra_headers=headers)
            streamed = await create(
                model="gpt-4o-mini", messages=said("one"), stream=True, extra_headers=headers
            )
            chunks = [chunk async for chunk in streamed.parse()]
            later = await create(
                model="gpt-4o-mini",
                messages=said("one"),
                extra_headers={**headers, "Prefer": "respond-async"},
            )
    finally:
        tracing.install(None)
    # Expect each retry answered from the first's job, naming that job's trace (the streamed
    # and the async one named their own request's, a trace nothing else is in)
    assert first.parse().choices[0].message.content == "mock reply to: one"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "mock reply to: one"
    )
    assert later.http_response.status_code == 200
    assert door.gateway.mock.stats.calls == 1
    trace_id = first.headers["x-queuegate-trace-id"]
    assert [r.headers["x-queuegate-trace-id"] for r in (plain, streamed, later)] == [trace_id] * 3


async def test_concurrent_streams_of_one_key_each_get_the_whole_answer(door: Door) -> None:
    headers = {"Idempotency-Key": KEY}

    async def read(client: openai.AsyncOpenAI) -> str:
        stream = await client.chat.completions.create(
            model="flaky-gpt", messages=said("a story"), stream=True, extra_headers=headers
        )
        return "".join([chunk.choices[0].delta.content or "" async for chunk in stream])

    async with door.client() as client, asyncio.timeout(20):
        texts = await asyncio.gather(*(read(client) for _ in range(4)))
    assert texts == ["mock reply to: a story"] * 4
    assert door.gateway.mock.stats.calls == 1


async def test_a_stream_joining_one_already_under_way_gets_the_whole_answer(door: Door) -> None:
    headers = {"Idempotency-Key": KEY}
    async with door.client() as client, asyncio.timeout(20):
        # Given a stream of the key whose first chunk has been read
        first = await client.chat.completions.create(
            model="flaky-gpt", messages=said("a story"), stream=True, extra_headers=headers
        )
        parts = [(await anext(first)).choices[0].delta.content or ""]
        # When the same request is streamed again (a retry), before or after the first ends
        again = await client.chat.completions.create(
            model="flaky-gpt", messages=said("a story"), stream=True, extra_headers=headers
        )
        joined = "".join([chunk.choices[0].delta.content or "" async for chunk in again])
        parts += [chunk.choices[0].delta.content or "" async for chunk in first]
    # Expect both whole, from one call
    assert "".join(parts) == joined == "mock reply to: a story"
    assert door.gateway.mock.stats.calls == 1


async def test_a_conflict_answered_to_a_bound_job_never_reaches_its_waiter(
    door: Door, settings: Settings, redis_client: aioredis.Redis
) -> None:
    caller = Caller("alpha", door.key_ids["alpha"], door.keys["alpha"])

    def job(text: str) -> ChatJob:
        return ChatJob(job_id=job_id("alpha"), team="alpha", model="flaky-gpt", messages=said(text))

    async with Bridge(settings) as bridge:
        # Given a front-door process waiting for "first", bound to the key, its call under way
        await bridge.submit(job("first"), caller, bound=True)
        await claimed(settings, redis_client, "alpha")
        # When "second" reaches a worker under the same job id, answered to the same process
        await bridge.publish(job("second"), caller)
        result = await bridge.wait(job_id("alpha"), 20)
    # Expect the worker's idempotency_conflict (the second delivery's) dropped there: the
    # waiter gets the job's own answer
    assert result.status == "ok" and result.content == "mock reply to: first"
    assert door.gateway.mock.stats.calls == 1


async def test_every_stream_of_a_job_gets_each_chunk_or_else_its_whole_answer(
    settings: Settings,
) -> None:
    # Given a reply queue read through an inbox, as a front-door process reads its own
    inbox = Inbox(keep_unexpected=False)
    job = "job-told-twice"

    async def nothing() -> None:
        return None

    def reader() -> ChatStream:
        stream = ChatStream(job, nothing, 10)
        inbox.open(stream)
        return stream

    answer = {"choices": [{"message": {"role": "assistant", "content": "abc"}}]}
    result = ChatResult(
        job_id=job, team="alpha", status="ok", response=answer,
        gateway=GatewayInfo(model_requested="gpt-4o-mini"),
    )  # fmt: skip
    connection = await aio_pika.connect_robust(settings.amqp_url)
    async with connection, asyncio.timeout(20):
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        await consume(channel, queue.name, inbox.handle)

        async def send(reply: StreamChunk | ChatResult) -> None:
            kind = MESSAGE_TYPE_RESULT if isinstance(reply, ChatResult) else MESSAGE_TYPE_CHUNK
            message = aio_pika.Message(
                reply.model_dump_json().encode(), type=kind, correlation_id=job
            )
            await channel.default_exchange.publish(message, routing_key=queue.name)

        # When two streams of the job read its first chunk, a third opens, then the rest comes
        early = [reader(), reader()]
        await send(StreamChunk(job_id=job, seq=0, delta={"content": "a"}))
        firsts = [(await anext(stream)).delta["content"] for stream in early]
        late = reader()
        for seq, text in ((1, "b"), (2, "c")):
            await send(StreamChunk(job_id=job, seq=seq, delta={"content": text}))
        await send(result)
        rests = [[chunk.delta["content"] async for chunk in stream] for stream in early]
        missed = [chunk async for chunk in late]
        # and a fourth opens after the result, which comes again (its own delivery's answer)
        after = reader()
        await send(result)
        none = [chunk async for chunk in after]

    # Expect the early ones each to get every chunk, and the others no chunk but the result
    assert firsts == ["a", "a"] and rests == [["b", "c"], ["b", "c"]]
    assert missed == none == []
    assert [s.result for s in (*early, late, after)] == [result] * 4
