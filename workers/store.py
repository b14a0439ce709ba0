"""Finished jobs kept in Redis by job id, so a redelivered job is answered without a new call."""

from __future__ import annotations

import logging

import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.exceptions import RedisError

from queuegate.keys import Keys
from queuegate.outage import OutageLog
from workers.outcome import Outcome

log = logging.getLogger(__name__)


class OutcomeStore:
    """Best effort by design: while Redis is down jobs are still served and acknowledged.

    The cost of a miss is a second provider call for a job redelivered in that window; the
    producer and accounting both drop the duplicate by job id, so nothing is counted twice.
    """

    def __init__(self, client: aioredis.Redis, keys: Keys, ttl: int) -> None:
        self._client = client
        self._keys = keys
        self._ttl = ttl
        self._outage = OutageLog(log, "Redis", "finished jobs are not remembered")

    async def get(self, team: str, job_id: str) -> Outcome | None:
        try:
            raw: bytes | str | None = await self._client.get(self._keys.result(team, job_id))
        except RedisError as exc:
            self._outage.failed(exc)
            return None
        self._outage.recovered()
        if raw is None:
            return None
        try:
            return Outcome.model_validate_json(raw)
        except ValidationError:
            log.warning("stored outcome of job %s is unreadable; serving the job again", job_id)
            return None

    async def put(self, outcome: Outcome) -> None:
        try:
            await self._client.set(
                self._keys.result(outcome.result.team, outcome.result.job_id),
                # Captured prompts go to the audit table only, never into the cache.
                outcome.model_dump_json(exclude={"usage": {"content"}}),
                ex=self._ttl,
            )
        except RedisError as exc:
            self._outage.failed(exc)
            return
        self._outage.recovered()
