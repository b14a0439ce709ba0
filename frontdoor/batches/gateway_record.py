"""The gateway's record of a batch (``workers.batch_state``), read and written by the front
door itself in Redis, for a batch whose API key was revoked, and to give a batch's copy up
to the team or let it go (``hand_over``), which the team's control requests cannot.

A runner keeps a batch's state as the team does, through the control plane, proven by the
key that created the batch (``producer.batch.state``). Once that key is revoked the gateway
refuses it, as it must: the key acts for no one any more, so nothing more is published or
served. Yet the jobs answered before, already paid for, have their results waiting in the
batch's results queue, and they belong in the batch's files. The front door is trusted
with Redis as the workers are (it reads stored outcomes the same way, ``frontdoor.outcomes``),
so it finishes the batch itself: it records what it collects under the batch's own keys,
with the steps the control plane runs, and publishes nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import redis.asyncio as aioredis

from queuegate.control import BatchMeta, Category, Counts
from queuegate.keys import Keys
from workers.batch_state import BatchState


class GatewayRecord:
    """One batch's record, with the steps collect takes (``producer.batch.CollectState``)."""

    def __init__(self, client: aioredis.Redis, keys: Keys, team: str, name: str) -> None:
        self.team = team
        self.name = name
        self._state = BatchState(client, keys, team, name)
        self._meta: BatchMeta | None = None

    async def load(self) -> BatchMeta | None:
        # Loading also dates the keys' expiry, which every later write sets.
        self._meta = await self._state.load()
        return self._meta

    async def require(self) -> BatchMeta:
        self._meta = await self._state.require()
        return self._meta

    async def _recorded(self) -> BatchMeta:
        return self._meta or await self.require()

    async def counts(self, meta: BatchMeta | None = None) -> Counts:
        return await self._state.counts(meta or await self._recorded())

    async def line_numbers(self, custom_ids: Sequence[str]) -> list[int | None]:
        return await self._state.line_numbers(custom_ids)

    async def written_among(self, custom_ids: Sequence[str]) -> list[bool]:
        return await self._state.written_among(custom_ids)

    async def mark_written(self, entries: Sequence[tuple[str, Category, int]]) -> None:
        await self._recorded()
        await self._state.mark_written(entries)

    async def unwritten(self) -> AsyncIterator[list[tuple[str, bool]]]:
        cursor = 0
        while True:
            cursor, chunk = await self._state.unwritten(cursor)
            if chunk:
                yield chunk
            if cursor == 0:
                return

    async def is_canceled(self) -> bool:
        return await self._state.is_canceled()

    async def cancel(self) -> None:
        """Workers answer the batch's jobs they have not served yet ``canceled``, uncalled."""
        await self._recorded()
        await self._state.cancel()

    async def lock(self) -> None:
        """No collect lock: the runner's lease holds the batch."""
        return None

    async def hand_over(self) -> None:
        """The batch is no longer the front door's (``BatchMeta.front_door`` cleared): the
        gateway deletes it at the team's request, and the team's own collect once done."""
        await self._state.hand_over()

    async def delete(self) -> None:
        """Forget the batch's record; its results queue, empty once collected, expires unused
        (``QUEUEGATE_RESULTS_QUEUE_EXPIRES``)."""
        await self._state.delete()
