"""Asking again for results a full results queue refused.

A batch's results queue is bounded (``reply_queue_max_bytes``, ``reply_queue_max_length``);
past it the broker refuses a result, and the worker acknowledges and accounts the job all
the same, its outcome kept ``result_ttl``. Collect finds such a request still without a line
once its queue runs dry, and ``Resend`` publishes its job again: rebuilt from the submitted
file exactly as submit built it (same job id, same request, same proof of the team), so a
worker answers it from the stored outcome, neither calling a provider nor billing it again.
A job still in flight is held by its claim until its first delivery ends, and then answered
the same way; one never served is served once, as its first delivery would have been.

Jobs are asked for in chunks whose results fit in half the queue's bound, the next chunk
once the last one is written: asking for all at once would overflow it again. A chunk not
all written is asked for again after a wait that doubles (up to ``LAST_WAIT``): its jobs may
still wait in the team's queue behind a backlog, and each copy asked for is answered from
the first delivery's outcome, a slot of the team's queue its only cost.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from producer.batch.jobs import JobReader
from producer.batch.lines import BatchFile
from producer.batch.state import CollectState
from producer.client import GatewayClient
from queuegate.control import BatchMeta
from queuegate.errors import QueueFull
from queuegate.messages import ChatJob

log = logging.getLogger(__name__)

GUESS = 4096
"""Bytes of a result assumed before any was read: a short chat answer with its metadata."""
FIRST_WAIT = 1.0
LAST_WAIT = 30.0
"""Seconds before asking again for a chunk that brought nothing back, doubling: its jobs may
still wait in the team's queue, and each ask adds a copy there."""


class Resend:
    """Publishes the jobs of custom_ids the results queue lost, paced to fit its bound.

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
        source: Path | None = None,
    ) -> None:
        self._client = client
        self._meta = meta
        self._reply_to = reply_to
        self._max_bytes = max_bytes
        self._max_length = max_length
        self._source = source or (Path(meta.source) if meta.source else None)
        self._read = 0
        self._read_bytes = 0
        self._wait = FIRST_WAIT
        self._next = 0.0
        self._asked: list[str] = []
        self._warned = False
        self.asked = 0
        """Jobs published again by this run."""

    def saw(self, body_bytes: int) -> None:
        """A result read from the queue: its size sizes the chunks."""
        self._read += 1
        self._read_bytes += body_bytes

    def chunk(self) -> int:
        """Jobs asked for at once: their results in half the queue's bound, late results
        of the first delivery taking the other half."""
        size = self._read_bytes // self._read if self._read else GUESS
        return max(1, min(self._max_length // 2, self._max_bytes // (2 * size)))

    async def again(self, state: CollectState) -> int:
        """Ask again for the next chunk of published requests without a line, once the last
        chunk asked for is all written, or after a wait that doubles while it is not; how
        many jobs the team's queue took."""
        if self._asked:
            written = await state.written_among(self._asked)
            if all(written):
                self._wait = FIRST_WAIT
            elif time.monotonic() < self._next:
                return 0
            else:
                self._wait = min(self._wait * 2, LAST_WAIT)
        size = self.chunk()
        missing: list[str] = []
        async for chunk in state.unwritten():
            missing += [custom_id for custom_id, published in chunk if published]
            if len(missing) >= size:
                break
        self._asked = missing[:size]
        self._next = time.monotonic() + self._wait
        jobs = self._jobs(set(self._asked))
        if jobs is None:
            if not self._warned:
                self._warned = True
                log.warning("%s", self._lost())
            return 0
        sent = 0
        for job in jobs:
            try:
                await self._client.publish(job, reply_to=self._reply_to)
            except QueueFull:
                break  # asked for again once the team's queue has room
            sent += 1
        if sent:
            log.info("batch %s: asked again for %d results", self._meta.name, sent)
        self.asked += sent
        return sent

    def _jobs(self, wanted: set[str]) -> list[ChatJob] | None:
        """The jobs of ``wanted``, each from the first valid entry of its custom_id, as
        submit indexed it; the whole file read, to prove it is the one submitted (None when
        it is not, or is gone)."""
        if self._source is None or not self._source.is_file():
            return None
        reader = JobReader(
            batch=self._meta.name,
            jobs=self._meta.jobs,
            team=self._meta.team,
            model=self._meta.model,
            deadline=self._meta.deadline,
            format=self._meta.format,
        )
        file = BatchFile(self._source)
        jobs: dict[str, ChatJob] = {}
        for _, entry in file:
            custom_id = entry.get("custom_id") if isinstance(entry, dict) else None
            if custom_id not in wanted or custom_id in jobs:
                continue
            try:
                jobs[custom_id] = reader.job(entry)
            except ValueError:
                continue  # not indexed by submit: a later entry may be the valid one
        if file.digest.hexdigest() != self._meta.fingerprint:
            return None
        return list(jobs.values())

    def _lost(self) -> str:
        where = f"{self._source} is gone or changed" if self._source else "no file recorded"
        return (
            f"batch {self._meta.name!r} cannot ask again for results its full results queue "
            f"may have refused ({where}): collect again with --file naming the file it was "
            "submitted from, or they are written expired at its deadline"
        )
