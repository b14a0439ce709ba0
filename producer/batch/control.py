"""Following and canceling a batch."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import redis.asyncio as aioredis

from producer.batch.jobs import check_batch_name
from producer.batch.state import BatchState, Counts
from queuegate.broker import connect
from queuegate.keys import Keys
from queuegate.settings import Settings
from queuegate.topology import Topology


@dataclass(frozen=True)
class BatchStatus:
    name: str
    team: str
    format: str
    deadline: datetime
    counts: Counts
    waiting: int
    """Results in the reply queue, answered but not collected yet."""

    @property
    def queued(self) -> int:
        """Requests not answered yet (published or not)."""
        return max(0, self.counts.total - self.counts.written - self.waiting)

    @property
    def rate(self) -> float | None:
        """Results written per second since the first."""
        first, last = self.counts.first_written, self.counts.last_written
        if first is None or last is None or last <= first:
            return None
        return self.counts.written / (last - first)

    @property
    def eta_s(self) -> float | None:
        left = self.counts.total - self.counts.written
        if left == 0:
            return 0.0
        rate = self.rate
        return left / rate if rate else None


async def batch_status(settings: Settings, name: str) -> BatchStatus:
    """Counts, spend and pace of a batch, from Redis and its reply queue."""
    return await _status(settings, check_batch_name(name), cancel=False)


async def cancel_batch(settings: Settings, name: str) -> BatchStatus:
    """Cancel a batch: workers answer its remaining jobs ``canceled`` without calling a
    provider, submit publishes no more, and collect writes what remains as ``canceled``."""
    return await _status(settings, check_batch_name(name), cancel=True)


async def _status(settings: Settings, name: str, *, cancel: bool) -> BatchStatus:
    redis = aioredis.from_url(settings.redis_url)
    try:
        state = BatchState(redis, Keys(settings.redis_prefix), name)
        meta = await state.require()
        if cancel:
            await state.cancel()
        counts = await state.counts(meta)
    finally:
        await redis.aclose()
    topology = Topology(settings.namespace, settings.delivery_limit)
    connection = await connect(settings.amqp_url, name=f"batch-status:{name}")
    async with connection:
        channel = await connection.channel()
        queue = await topology.declare_results_queue(channel, meta.team, name)
        result = queue.declaration_result
        waiting = int(result.message_count or 0) if result is not None else 0
    return BatchStatus(name, meta.team, meta.format, meta.deadline, counts, waiting)
