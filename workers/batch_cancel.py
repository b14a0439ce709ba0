"""The worker's side of batch cancel: a job of a canceled batch is answered, not served."""

from __future__ import annotations

import logging

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from queuegate.errors import Canceled
from queuegate.keys import Keys
from queuegate.messages import ChatJob

log = logging.getLogger(__name__)


class BatchCancels:
    """Checks the cancel flag of a job's batch (``metadata["batch"]``) before it is served.

    The flag is the job's team's own (the team is the queue's, checked before): a batch of
    the same name in another team is another batch.

    Best effort: while Redis is down the job is served, as it would have been uncanceled.
    """

    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self._client = client
        self._keys = keys

    async def check(self, job: ChatJob) -> None:
        """Raise Canceled when the job's batch was canceled."""
        batch = job.metadata.get("batch")
        if not isinstance(batch, str):
            return
        try:
            canceled = await self._client.exists(self._keys.batch_canceled(job.team, batch))
        except RedisError as exc:
            log.warning("cannot read the cancel flag of batch %s (%s)", batch, type(exc).__name__)
            return
        if canceled:
            raise Canceled(f"batch {batch} was canceled before this request was served")
