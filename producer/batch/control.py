"""Following, canceling, listing and deleting a team's batches, through the gateway."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from producer.batch.jobs import check_batch_name
from producer.batch.state import BatchState, list_batches
from producer.client import GatewayClient
from queuegate.control import BatchSummary, Counts
from queuegate.settings import Settings


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
        """Published requests not answered yet: never more than were published."""
        return self.counts.unanswered(self.waiting)

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


async def batch_status(settings: Settings, name: str, *, team: str, **who: Any) -> BatchStatus:
    """Counts, spend and pace of one of ``team``'s batches, from the gateway.

    ``who``: ``user_id`` and ``api_key``, as for GatewayClient.
    """
    async with GatewayClient(settings, team=team, listen=False, **who) as client:
        await client.control.check_served()
        meta, counts, waiting = await BatchState(client.control, check_batch_name(name)).status()
    return BatchStatus(name, meta.team, meta.format, meta.deadline, counts, waiting)


async def cancel_batch(settings: Settings, name: str, *, team: str, **who: Any) -> BatchStatus:
    """Cancel a batch: workers answer its remaining jobs ``canceled`` without calling a
    provider, submit publishes no more, and collect writes ``canceled`` for the requests
    never published; a request already being served keeps its real answer."""
    async with GatewayClient(settings, team=team, listen=False, **who) as client:
        meta, counts, waiting = await BatchState(client.control, check_batch_name(name)).cancel()
    return BatchStatus(name, meta.team, meta.format, meta.deadline, counts, waiting)


async def delete_batch(settings: Settings, name: str, *, team: str, **who: Any) -> None:
    """Forget a batch: its state and its results queue, with any result not collected.
    ControlRefused while published requests are not answered yet (``cancel_batch`` first):
    they would still be called and billed."""
    async with GatewayClient(settings, team=team, listen=False, **who) as client:
        await BatchState(client.control, check_batch_name(name)).delete()


async def batch_list(settings: Settings, *, team: str, **who: Any) -> list[BatchSummary]:
    """The team's batches the gateway still keeps."""
    async with GatewayClient(settings, team=team, listen=False, **who) as client:
        await client.control.check_served()
        return await list_batches(client.control)
