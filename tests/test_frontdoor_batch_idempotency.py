"""Creating a batch (OpenAI's Batch API, Anthropic's Message Batches) under an
``Idempotency-Key``, as a chat request is: the SDK retries a create whose answer it lost,
and the retry is answered the batch the first attempt made, each line called once; the same
key on a different request is refused 422 ``idempotency_conflict``. Against the real front
door, gateway and mock provider, through the official SDKs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import pytest

from queuegate.settings import Settings
from tests.frontdoor_support import Door, open_door
from tests.test_frontdoor_batches import (
    anthropic_ended,
    jsonl,
    message_requests,
    openai_ended,
    openai_lines,
)

KEY = {"Idempotency-Key": "nightly-2026-12-05"}


class LoseFirstAnswer(httpx.AsyncHTTPTransport):
    """The openai SDK's transport: the first answer to a batch create is lost after the
    front door acted on it (a connection reset), so the SDK retries the create."""

    lost = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        if _lost(self, request.method, request.url.path):
            await response.aread()
            await response.aclose()
            raise httpx.ReadError("connection reset (simulated)", request=request)
        return response


class LoseFirstAnswer2(httpx2.AsyncHTTPTransport):
    """The same for the anthropic SDK, which speaks httpx2."""

    lost = False

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await super().handle_async_request(request)
        if _lost(self, request.method, request.url.path):
            await response.aread()
            await response.aclose()
            raise httpx2.ReadError("connection reset (simulated)", request=request)
        return response


def _lost(transport: LoseFirstAnswer | LoseFirstAnswer2, method: str, path: str) -> bool:
    if transport.lost or method != "POST" or not path.endswith("/batches"):
        return False
    transport.lost = True
    return True


@pytest.fixture
async def door(settings: Settings) -> AsyncIterator[Door]:
    async with open_door(settings) as opened:
        yield opened


def retrying_openai(door: Door, transport: LoseFirstAnswer) -> openai.AsyncOpenAI:
    """The SDK as it comes (2 retries), over ``transport``."""
    client = httpx.AsyncClient(transport=transport)
    return openai.AsyncOpenAI(base_url=door.v1, api_key=door.keys["alpha"], http_client=client)


def retrying_anthropic(door: Door, transport: LoseFirstAnswer2) -> anthropic.AsyncAnthropic:
    client = httpx2.AsyncClient(transport=transport)
    return anthropic.AsyncAnthropic(
        base_url=door.url, api_key=door.keys["alpha"], http_client=client
    )


async def requests_files(door: Door, team: str) -> int:
    """The Message Batches' stored request files of ``team``."""
    count: int = await door.gateway.pool.fetchval(
        "SELECT count(*) FROM api_files WHERE team = $1 AND purpose = 'message_batch_requests'",
        team,
    )
    return count


async def test_an_openai_batch_create_retried_after_its_answer_was_lost_makes_one_batch(
    door: Door,
) -> None:
    lossy = LoseFirstAnswer()
    async with retrying_openai(door, lossy) as client:
        # Given a file of 3 lines
        uploaded = await client.files.create(
            file=("in.jsonl", jsonl(openai_lines(3))), purpose="batch"
        )
        asked: dict[str, Any] = {
            "input_file_id": uploaded.id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            "metadata": {"run": "nightly"},
        }
        # When a batch of it is created under a key, and the first answer is lost
        batch = await client.batches.create(**asked, extra_headers=KEY)
        ended = await openai_ended(client, batch.id)
        # and the create is sent again under the key once the batch has ended
        again = await client.batches.create(**asked, extra_headers=KEY)
        listed = [b.id async for b in client.batches.list()]

    # Expect one batch, the answer to both, each line called and billed once
    assert lossy.lost
    assert listed == [batch.id]
    assert again.id == batch.id and again.status == ended.status == "completed"
    rows = await door.gateway.usage_rows(3)
    assert len(rows) == 3
    assert door.gateway.mock.stats.calls == 3


async def test_a_message_batch_create_retried_after_its_answer_was_lost_makes_one_batch(
    door: Door,
) -> None:
    lossy = LoseFirstAnswer2()
    async with retrying_anthropic(door, lossy) as client:
        # When a Message Batch of 3 requests is created under a key, the first answer lost
        batch = await client.messages.batches.create(
            requests=message_requests(3),  # type: ignore[arg-type]
            extra_headers=KEY,
        )
        ended = await anthropic_ended(client, batch.id)
        listed = [b.id async for b in client.messages.batches.list()]

    # Expect one batch, its requests stored once, each called and billed once
    assert lossy.lost
    assert listed == [batch.id]
    assert ended.request_counts.succeeded == 3
    assert await requests_files(door, "alpha") == 1
    rows = await door.gateway.usage_rows(3)
    assert len(rows) == 3
    assert door.gateway.mock.stats.calls == 3


async def test_a_different_batch_under_a_used_key_is_refused_as_a_chat_request_is(
    door: Door,
) -> None:
    async with door.client() as client, door.client("beta") as beta:
        uploaded = await client.files.create(
            file=("in.jsonl", jsonl(openai_lines(1))), purpose="batch"
        )
        asked: dict[str, Any] = {
            "input_file_id": uploaded.id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        }
        # Given a chat request and a batch, each made under its key
        await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Hi"}],
            extra_headers={"Idempotency-Key": "chat-1"},
        )
        first = await client.batches.create(**asked, extra_headers=KEY)
        # When a different chat request, and a batch with other metadata, reuse the keys
        with pytest.raises(openai.UnprocessableEntityError) as chat_refused:
            await client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "Hello"}],
                extra_headers={"Idempotency-Key": "chat-1"},
            )
        with pytest.raises(openai.UnprocessableEntityError) as batch_refused:
            await client.batches.create(**asked, metadata={"run": "2"}, extra_headers=KEY)
        # and another team's batch uses the batch's key
        beta_file = await beta.files.create(
            file=("in.jsonl", jsonl(openai_lines(1))), purpose="batch"
        )
        theirs = await beta.batches.create(
            **{**asked, "input_file_id": beta_file.id}, extra_headers=KEY
        )
        listed = [b.id async for b in client.batches.list()]

    # Expect the batch refused as the chat request is, in the same words
    assert batch_refused.value.code == chat_refused.value.code == "idempotency_conflict"
    assert batch_refused.value.message == chat_refused.value.message
    assert listed == [first.id]
    # and the other team's key its own
    assert theirs.id != first.id


async def test_a_message_batch_under_a_used_key_is_refused_and_stores_nothing(
    door: Door,
) -> None:
    async with anthropic.AsyncAnthropic(
        base_url=door.url, api_key=door.keys["alpha"], max_retries=0
    ) as client:
        # Given a Message Batch made under a key
        first = await client.messages.batches.create(
            requests=message_requests(2),  # type: ignore[arg-type]
            extra_headers=KEY,
        )
        # When other requests come under the key, and an OpenAI batch does
        with pytest.raises(anthropic.UnprocessableEntityError) as refused:
            await client.messages.batches.create(
                requests=message_requests(3),  # type: ignore[arg-type]
                extra_headers=KEY,
            )
        async with door.client() as openai_client:
            uploaded = await openai_client.files.create(
                file=("in.jsonl", jsonl(openai_lines(1))), purpose="batch"
            )
            with pytest.raises(openai.UnprocessableEntityError):
                await openai_client.batches.create(
                    input_file_id=uploaded.id,
                    endpoint="/v1/chat/completions",
                    completion_window="24h",
                    extra_headers=KEY,
                )
        listed = [b.id async for b in client.messages.batches.list()]

    # Expect each refused, in Anthropic's shape for its own API, and no second batch made
    assert refused.value.status_code == 422
    assert refused.value.type == "invalid_request_error"
    assert refused.value.api_message is not None
    assert refused.value.api_message.startswith("idempotency_conflict: ")
    assert listed == [first.id]
    assert await requests_files(door, "alpha") == 1


async def test_creates_racing_under_one_key_make_one_batch_of_each_api(door: Door) -> None:
    async with (
        door.client() as client,
        anthropic.AsyncAnthropic(
            base_url=door.url, api_key=door.keys["alpha"], max_retries=0
        ) as messages,
    ):
        uploaded = await client.files.create(
            file=("in.jsonl", jsonl(openai_lines(2))), purpose="batch"
        )
        # When 8 creates of one batch race under one key, for each API
        openai_made = await asyncio.gather(
            *(
                client.batches.create(
                    input_file_id=uploaded.id,
                    endpoint="/v1/chat/completions",
                    completion_window="24h",
                    extra_headers={"Idempotency-Key": "race-openai"},
                )
                for _ in range(8)
            )
        )
        anthropic_made = await asyncio.gather(
            *(
                messages.messages.batches.create(
                    requests=message_requests(2),  # type: ignore[arg-type]
                    extra_headers={"Idempotency-Key": "race-anthropic"},
                )
                for _ in range(8)
            )
        )
        await openai_ended(client, openai_made[0].id)
        await anthropic_ended(messages, anthropic_made[0].id)

    # Expect every one answered the one batch made, whose requests alone are stored
    assert len({b.id for b in openai_made}) == 1
    assert len({b.id for b in anthropic_made}) == 1
    assert await requests_files(door, "alpha") == 1
    # each line called once
    await door.gateway.usage_rows(4)
    assert door.gateway.mock.stats.calls == 4
