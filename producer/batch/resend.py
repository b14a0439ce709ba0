"""Asking again for results a full results queue refused.

A batch's results queue is bounded (``reply_queue_max_bytes``, ``reply_queue_max_length``);
past it the broker refuses a result, and the worker acknowledges and accounts the job all
the same, its outcome kept ``result_ttl``. Once the queue runs dry, collect asks the
gateway which requests still without a line have a stored outcome, and ``Resend``
publishes their jobs again: rebuilt from the submitted file exactly as submit built them
(same job id, same request, same proof of the team), so a worker answers each from its
stored outcome, neither calling a provider nor billing it again. Only jobs with a stored
outcome are asked for: one still in its queue, or in a call (its claim held), is answered
by its first delivery, and asked for only if that answer is refused too.

Jobs sent again carry no TTL: past the batch's deadline the broker would drop them, though
their answers are stored. (A job whose outcome were gone meanwhile would be refused
uncalled by the worker, past the deadline, or found in usage_log: never served twice.)

They are asked for in chunks whose results fit in half the queue's bound, the next chunk
as soon as the last one is written: asking for all at once would overflow it again. A chunk not
all written is asked for again after a wait that doubles (up to ``LAST_WAIT``): the workers
may be down or behind, and each copy waits in the team's queue meanwhile. The requests found
stored are kept until written, and the walk over those without a line goes on where the last
chunk left it, starting over only once it has ended: each chunk asks the gateway about the
requests past the last one, not again about every one before. The file is read once
(``producer.batch.submitted``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from pathlib import Path

from producer.batch.jobs import JobReader
from producer.batch.state import BatchState
from producer.batch.submit import WINDOW
from producer.batch.submitted import SubmittedFile
from producer.client import GatewayClient
from queuegate.control import BatchMeta
from queuegate.errors import BatchError, QueueFull
from queuegate.messages import ChatJob

log = logging.getLogger(__name__)

GUESS = 4096
"""Bytes of a result assumed before any was read: a short chat answer with its metadata."""
FIRST_WAIT = 1.0
LAST_WAIT = 30.0
"""Seconds before asking again while the last chunk is not all written, doubling."""

Source = Path | Callable[[], Awaitable[Path]]
"""The submitted file, or how to fetch it when first needed (the front door keeps its
batches' input in PostgreSQL)."""


class Resend:
    """Publishes the jobs of requests whose stored results the results queue refused.

    ``source``: the submitted file; ``None`` takes the path submit recorded. Its digest must
    be the batch's: another file's requests would be refused under the same job ids."""

    def __init__(
        self,
        client: GatewayClient,
        meta: BatchMeta,
        *,
        reply_to: str,
        max_bytes: int,
        max_length: int,
        source: Source | None = None,
    ) -> None:
        self._client = client
        self._state = BatchState(client.control, meta.name)
        self._meta = meta
        self._reply_to = reply_to
        self._max_bytes = max_bytes
        self._max_length = max_length
        self._source: Source | None = source or (Path(meta.source) if meta.source else None)
        self._read = 0
        self._read_bytes = 0
        self._wait = FIRST_WAIT
        self._next = 0.0
        self._file: SubmittedFile | None = None
        self._asked: list[str] = []
        self._pending: set[str] = set()
        """What was asked for and is not written yet."""
        self._stored: dict[str, None] = {}
        """Requests found stored and without a line, in the order found: a chunk not all
        written is asked for again first."""
        self._walk: AsyncGenerator[list[tuple[str, bool]], None] | None = None
        """The pages of requests without a line, where the last chunk stopped reading them."""
        self._unreachable: set[str] = set()
        self.asked = 0
        """Jobs published again by this run."""

    def saw(self, body_bytes: int) -> None:
        """A result read from the queue: its size sizes the chunks."""
        self._read += 1
        self._read_bytes += body_bytes

    def chunk(self) -> int:
        """Jobs asked for at once: their results in half the queue's bound, late results
        of first deliveries taking the other half."""
        size = self._read_bytes // self._read if self._read else GUESS
        return max(1, min(self._max_length // 2, self._max_bytes // (2 * size)))

    def written(self, custom_ids: Iterable[str]) -> None:
        """Lines now written: the next chunk is asked for once the last one is all written."""
        ids = set(custom_ids)
        self._pending -= ids
        for custom_id in ids.intersection(self._stored):
            del self._stored[custom_id]

    @property
    def ready(self) -> bool:
        """A chunk was asked for and is all written: ask for the next at once."""
        return bool(self._asked) and not self._pending

    async def answered(self, custom_ids: Sequence[str]) -> set[str]:
        """Those of ``custom_ids`` the gateway answered or is answering (outcome stored, or
        claim held): not to be written expired, their answers to come."""
        outcomes = await self._state.outcomes_among(custom_ids)
        return {c for c, o in zip(custom_ids, outcomes, strict=True) if o is not None}

    async def again(self) -> int:
        """Ask again for the next chunk of requests without a line whose outcome is stored,
        once the last chunk is all written, or after a wait that doubles while it is not;
        how many jobs the team's queue took."""
        now = time.monotonic()
        if self.ready:
            self._wait = FIRST_WAIT
        elif now < self._next:
            return 0
        self._asked = await self._stored_unwritten(self.chunk())
        self._pending = set(self._asked)
        self._next = now + self._wait
        self._wait = min(self._wait * 2, LAST_WAIT)
        if not self._asked:
            return 0
        jobs = await self._jobs(self._asked)
        if jobs is None:
            # Stored and unwritten at two looks a wait apart: refused, not on their way.
            if self._unreachable.intersection(self._asked):
                raise BatchError(self._lost())
            self._unreachable = set(self._asked)
            return 0
        sent = 0
        for start in range(0, len(jobs), WINDOW):
            window = jobs[start : start + WINDOW]
            published = await asyncio.gather(
                *(self._client.publish(j, reply_to=self._reply_to, expires=False) for j in window),
                return_exceptions=True,
            )
            for failure in published:
                # A full team queue: those are asked for again once it has room.
                if isinstance(failure, BaseException) and not isinstance(failure, QueueFull):
                    raise failure
            sent += sum(1 for failure in published if failure is None)
        log.info("batch %s: asked again for %d stored results", self._meta.name, sent)
        self.asked += sent
        return sent

    async def _stored_unwritten(self, size: int) -> list[str]:
        """Up to ``size`` requests whose outcome is stored and that have no line: those found
        before first, then the next found by the walk, which starts over (at most once a
        call) once it has ended, as requests are stored while collect runs."""
        started = False
        while len(self._stored) < size:
            if self._walk is None:
                if started:
                    break
                self._walk, started = self._state.unwritten(), True
            page = await anext(self._walk, None)
            if page is None:
                self._walk = None
                continue
            ids = [c for c, published in page if published and c not in self._stored]
            outcomes = await self._state.outcomes_among(ids)
            found = (c for c, o in zip(ids, outcomes, strict=True) if o == "stored")
            self._stored.update(dict.fromkeys(found))
        return list(itertools.islice(self._stored, size))

    async def _jobs(self, wanted: list[str]) -> list[ChatJob] | None:
        """The jobs of ``wanted`` as submit published them, from the file read once, to
        prove it is the one submitted (None when it is not, or is gone)."""
        if self._file is None:
            if self._source is not None and not isinstance(self._source, Path):
                self._source = await self._source()
            if self._source is None:
                return None
            reader = JobReader.for_meta(self._meta)
            self._file = SubmittedFile.read(self._source, reader, self._meta.fingerprint)
            if self._file is None:
                return None
        lines = await self._state.line_numbers(wanted)
        return self._file.jobs(zip(wanted, lines, strict=True))

    async def aclose(self) -> None:
        """End the walk (while the gateway's client is open) and delete the copy of the
        file's entries."""
        if self._walk is not None:
            walk, self._walk = self._walk, None
            await walk.aclose()
        if self._file is not None:
            self._file.close()
            self._file = None

    def _lost(self) -> str:
        where = f"{self._source} is gone or changed" if self._source else "no file recorded"
        return (
            f"batch {self._meta.name!r} cannot ask again for the results its full results "
            f"queue refused ({where}): collect again with --file naming the file it was "
            "submitted from, before the gateway forgets them (QUEUEGATE_RESULT_TTL)"
        )
