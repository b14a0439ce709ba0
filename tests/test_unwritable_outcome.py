"""An answer the gateway cannot write (a lone surrogate, which no UTF-8 holds): the job is
answered with an error and its call billed, never failed in the worker and returned to its
queue, answered and billed by no one. No provider answer is known to make one (a lone
surrogate's escape is refused in a whole answer, made U+FFFD in a stream, never decoded by
redacting a key), so it is built here, where the worker builds its outcome."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
import redis.asyncio as aioredis

from queuegate.keys import Keys
from queuegate.messages import Attempt, AuditContent, ChatJob
from queuegate.settings import Settings
from router import Routed
from workers.cache import ResponseCache
from workers.outcome import Outcome, Timing, as_json, served, unwritable

LONE = "\ud83d"
"""Half of a surrogate pair, alone."""


def _job() -> ChatJob:
    return ChatJob.model_validate(
        {
            "job_id": "job-unwritable",
            "team": "alpha",
            "model": "m",
            "messages": [{"role": "user", "content": "Hello there"}],
        }
    )


def _routed() -> Routed:
    """An answer holding a lone surrogate, whose call the provider bills 5 and 5 tokens."""
    message = {"role": "assistant", "content": f"an emoji cut in half: {LONE}"}
    response: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
    }
    return Routed(
        response=response,
        model_used="m",
        deployment="d",
        provider="openai",
        fallback_used=False,
        attempts=[Attempt(model="m", deployment="d", provider="openai", status=200)],
        input_tokens=5,
        output_tokens=5,
        cached_tokens=0,
        cost_usd=Decimal("0.0001"),
        latency_ms=3.0,
    )


@pytest.mark.parametrize("capture", ["none", "full"])
def test_an_outcome_that_cannot_be_written_is_written_as_an_error_billed_as_served(
    capture: str,
) -> None:
    # Given a job served with an answer that cannot be written, its prompt and answer captured
    # for the audit log by its team, or not
    job, routed = _job(), _routed()
    outcome = served(job, routed, Timing(queued_ms=1.0, worker="w"))
    if capture == "full":
        content = AuditContent(capture="full", prompt=[{"role": "user"}], response=routed.response)
        outcome = Outcome(
            result=outcome.result, usage=outcome.usage.model_copy(update={"content": content})
        )
    with pytest.raises(ValueError, match="surrogates not allowed"):
        as_json(outcome)

    # When the worker writes it instead as its fallback does
    fallback = unwritable(outcome)
    as_json(fallback)

    # Expect it written: an error without the answer, anywhere, and its call billed as served
    assert fallback.result.status == "error" and fallback.result.response is None
    assert fallback.result.error is not None and fallback.result.error.code == "provider_error"
    usage = fallback.usage
    assert (usage.status, usage.error_code) == ("error", "provider_error")
    assert (usage.input_tokens, usage.output_tokens, usage.cost_usd) == (5, 5, Decimal("0.0001"))
    if capture == "full":
        assert usage.content is not None and usage.content.response is None
        assert usage.content.prompt == [{"role": "user"}]


async def test_an_answer_that_cannot_be_written_is_not_cached_and_fails_nothing(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given a response cache
    cache = ResponseCache(redis_client, Keys(settings.redis_prefix), ttl=60)

    # When an answer that cannot be written is put in it
    await cache.put(_job(), _routed())

    # Expect nothing raised (raised, it failed the job unbilled), and nothing cached
    assert await cache.get(_job()) is None
