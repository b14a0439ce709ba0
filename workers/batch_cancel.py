"""The worker's side of batch cancel: a job of a canceled batch is answered, not served."""

from __future__ import annotations

import logging
from functools import partial

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from queuegate.errors import Canceled
from queuegate.keys import Keys
from queuegate.messages import ChatJob
from workers.admission import Check

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

    def watch(self, job: ChatJob) -> Check | None:
        """The check to run while the job waits for admission; None for a job of no batch."""
        if not isinstance(job.metadata.get("batch"), str):
            return None
        # Run every second or so while Redis may be away: the outage is logged elsewhere.
        return partial(self.check, job, warn=False)

    async def check(self, job: ChatJob, *, warn: bool = True) -> None:
        """Raise Canceled when the job's batch was canceled."""
        batch = job.metadata.get("batch")
        if not isinstance(batch, str):
            return
        try:
            canceled = await self._client.exists(self._keys.batch_canceled(job.team, batch))
        except RedisError as exc:
            level = logging.WARNING if warn else logging.DEBUG
            log.log(
                level, "cannot read the cancel flag of batch %s (%s)", batch, type(exc).__name__
            )
            return
        if canceled:
            raise Canceled(f"batch {batch} was canceled before this request was served")
