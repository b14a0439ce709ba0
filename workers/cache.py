"""The response cache: exact-match answers in Redis, for jobs that opt in with ``cache``
or whose team caches by default (``TeamConfig.cache``; see ``wanted``).

The key is a hash of the team, the model (and fallbacks), the messages and the parameters,
so a team never reads another team's answers. A hit costs nothing: it is answered with the
stored response, marked ``cached``, and still accounted (no tokens, cost 0, ``cached`` set),
its ``usage`` saying the 0 tokens it is billed.
Best effort, like the outcome store: while Redis is down every lookup misses.
"""

from __future__ import annotations

import logging
from decimal import Decimal
from typing import Any

import redis.asyncio as aioredis
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticSerializationError
from redis.exceptions import RedisError

from queuegate.keys import Keys
from queuegate.messages import ChatJob, request_digest
from queuegate.outage import OutageLog
from queuegate.registry import TeamConfig
from router import Routed, billed_answer
from router.providers import Usage

log = logging.getLogger(__name__)


class _Entry(BaseModel):
    response: dict[str, Any]
    model_used: str
    deployment: str
    provider: str


class ResponseCache:
    def __init__(self, client: aioredis.Redis, keys: Keys, ttl: int) -> None:
        self._client = client
        self._keys = keys
        self._ttl = ttl
        self._outage = OutageLog(log, "Redis", "the response cache misses")

    async def get(self, job: ChatJob) -> Routed | None:
        """The cached answer to ``job`` as a Routed with no attempts, tokens or cost, or None.

        No tokens: the provider processed none, so buckets and token reports stay true, and
        the response's ``usage`` says so, as its usage row does (before, it said the cached
        call's tokens, and a caller's sums disagreed with ``queuegate usage``).
        """
        try:
            raw: bytes | str | None = await self._client.get(self._keys.cache(request_digest(job)))
        except RedisError as exc:
            self._outage.failed(exc)
            return None
        self._outage.recovered()
        if raw is None:
            return None
        try:
            entry = _Entry.model_validate_json(raw)
        except ValidationError:
            log.warning("cached answer for job %s is unreadable; calling the provider", job.job_id)
            return None
        return Routed(
            **entry.model_dump(exclude={"response"}),
            response=billed_answer(entry.response, Usage()),
            fallback_used=entry.model_used != job.model,
            attempts=[],
            input_tokens=0,
            output_tokens=0,
            cached_tokens=0,
            cost_usd=Decimal(0),
            latency_ms=0.0,
        )

    async def put(self, job: ChatJob, routed: Routed) -> None:
        entry = _Entry(
            response=routed.response,
            model_used=routed.model_used,
            deployment=routed.deployment,
            provider=routed.provider,
        )
        try:
            written = entry.model_dump_json()
        except PydanticSerializationError:
            # Raised, it failed the job in the worker, the call billed nowhere; its outcome,
            # which cannot be written either, is answered as an error and billed.
            log.warning("job %s: its answer cannot be written; it is not cached", job.job_id)
            return
        try:
            await self._client.set(self._keys.cache(request_digest(job)), written, ex=self._ttl)
        except RedisError as exc:
            self._outage.failed(exc)


def wanted(job: ChatJob, team: TeamConfig) -> bool:
    """Whether ``job`` is answered from the cache (and fills it).

    The job's own ``cache`` decides when it set one, either way: in a team that caches by
    default, some jobs still need a fresh answer (sampled variety, time-dependent prompts).
    A job that says nothing follows its team's default.
    """
    return team.cache if job.cache is None else job.cache
