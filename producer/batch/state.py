"""A batch's state, kept by the gateway under the team's own keys and reached through the
control plane: the team's tools never touch Redis. Same steps as the gateway's BatchState
(workers/batch_state.py), each one round trip, each over many custom_ids at once; what
submit and collect write, and why a re-run after a crash repeats nothing, is said there.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any, Protocol

from producer.control import ControlClient
from queuegate.control import (
    STEP_MAX,
    BatchLockRole,
    BatchMeta,
    BatchSummary,
    Category,
    Counts,
    Outcome,
    being_submitted,
    no_such_batch,
)
from queuegate.errors import BatchError
from queuegate.messages import decoded

OUTCOMES: dict[str, Outcome] = {"stored": "stored", "held": "held"}


class CollectState(Protocol):
    """What collect reads and records of a batch: ``BatchState``, through the gateway as
    the team, or the gateway's own record where a trusted caller reads it directly."""

    name: str
    team: str

    async def require(self) -> BatchMeta: ...

    async def counts(self, meta: BatchMeta | None = None) -> Counts: ...

    async def written_among(self, custom_ids: Sequence[str]) -> list[bool]: ...

    async def mark_written(self, entries: Sequence[tuple[str, Category, int]]) -> None: ...

    def unwritten(self) -> AsyncIterator[list[tuple[str, bool]]]: ...

    async def is_canceled(self) -> bool: ...

    async def lock(self) -> str | None:
        """The queue whose exclusive consumer holds the collect lock (producer/batch/
        lock.py); None for a caller that holds the batch by other means."""
        ...


class BatchState:
    """One batch of the client's team. Not safe for two submits or two collects at once."""

    def __init__(self, control: ControlClient, name: str) -> None:
        self._control = control
        self.name = name
        self.team = control.team
        self._run = secrets.token_hex(4)
        """This submit's own index, apart from another's of the same name at once."""

    async def _call(self, call: Any, **args: Any) -> Any:
        return await self._control.batch(call, self.name, **args)

    async def _steps(self, call: Any, name: str, items: Sequence[Any], **args: Any) -> list[Any]:
        """A step over many custom ids, sent ``STEP_MAX`` at a time (the most a worker takes
        in one): its answers, joined."""
        answers: list[Any] = []
        for start in range(0, len(items), STEP_MAX):
            answer = await self._call(call, **{name: list(items[start : start + STEP_MAX])}, **args)
            answers += answer or []
        return answers

    async def load(self) -> BatchMeta | None:
        raw = await self._call("load")
        return None if raw is None else decoded(BatchMeta, raw)

    async def require(self) -> BatchMeta:
        meta = await self.load()
        if meta is None:
            raise BatchError(no_such_batch(self.team, self.name))
        return meta

    async def create(self, meta: BatchMeta) -> None:
        """Record a new batch (the gateway declares its results queue too). Raises BatchError
        when another submit of its name recorded it first, under another submission."""
        recorded = await self._call("create", meta=meta.model_dump(mode="json"), run=self._run)
        if recorded is not None and recorded != meta.submission:
            raise BatchError(being_submitted(self.name))

    async def reset_index(self) -> None:
        await self._call("reset_index", run=self._run)

    async def index(self, entries: Sequence[tuple[str, int]]) -> list[int]:
        """Add (custom_id, line) pairs; for each, the line that holds the custom_id first."""
        return [int(n) for n in await self._steps("index", "entries", entries, run=self._run)]

    async def line_numbers(self, custom_ids: Sequence[str]) -> list[int | None]:
        raw = await self._steps("line_numbers", "ids", custom_ids)
        return [None if n is None else int(n) for n in raw]

    async def published_among(self, custom_ids: Sequence[str]) -> list[bool]:
        return [bool(b) for b in await self._steps("published_among", "ids", custom_ids)]

    async def written_among(self, custom_ids: Sequence[str]) -> list[bool]:
        return [bool(b) for b in await self._steps("written_among", "ids", custom_ids)]

    async def outcomes_among(self, custom_ids: Sequence[str]) -> list[Outcome | None]:
        """Per request, whether its job's outcome is stored or its claim held."""
        raw = await self._steps("outcomes_among", "ids", custom_ids)
        return [OUTCOMES.get(o) if isinstance(o, str) else None for o in raw]

    async def mark_published(self, custom_ids: Sequence[str]) -> None:
        await self._steps("mark_published", "ids", custom_ids)

    async def mark_written(self, entries: Sequence[tuple[str, Category, int]]) -> None:
        """Record (custom_id, category, nano-dollars) of lines now on disk, all new ones."""
        await self._steps("mark_written", "entries", entries)

    async def unwritten(self) -> AsyncGenerator[list[tuple[str, bool]], None]:
        """Chunks of (custom_id, published) for every request without a result line."""
        cursor = 0
        while True:
            cursor, chunk = await self._call("unwritten", cursor=cursor)
            if chunk:
                yield [(str(c), bool(p)) for c, p in chunk]
            if cursor == 0:
                return

    async def is_canceled(self) -> bool:
        return bool(await self._call("is_canceled"))

    async def counts(self, meta: BatchMeta | None = None) -> Counts:
        return decoded(Counts, await self._call("counts"))

    async def status(self) -> tuple[BatchMeta, Counts, int]:
        return _status(await self._call("status"))

    async def cancel(self) -> tuple[BatchMeta, Counts, int]:
        return _status(await self._call("cancel"))

    async def lock(self, role: BatchLockRole = "collect") -> str:
        """The name of the queue whose exclusive consumer holds the batch's lock for
        ``role`` (producer/batch/lock.py)."""
        return str(await self._call("lock", role=role))

    async def delete(self) -> None:
        """Forget the batch: its record, its progress and its results queue."""
        await self._call("delete")


async def list_batches(control: ControlClient) -> list[BatchSummary]:
    return [decoded(BatchSummary, b) for b in await control.batch("list")]


def _status(raw: Any) -> tuple[BatchMeta, Counts, int]:
    meta = decoded(BatchMeta, raw["meta"])
    return meta, decoded(Counts, raw["counts"]), int(raw["waiting"])
