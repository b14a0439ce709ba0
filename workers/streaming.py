"""Relaying a streamed job's deltas to its caller, as StreamChunks before the final result.

Chunks go to the job's ``reply_to`` one at a time, each confirmed before the next, so they
arrive in ``seq`` order and always before the result, which is published after them.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from typing import Any

from queuegate.messages import ChatJob, StreamChunk
from queuegate.provider_formats import ANTHROPIC_BODY, CHUNK_FIELDS
from queuegate.stored_stream import Replayed, replayed_deltas
from router.providers import Piece
from workers.publisher import Publisher

log = logging.getLogger(__name__)


class StreamRelay:
    """A Router ``on_delta`` sink that publishes each delta with the next ``seq``."""

    def __init__(
        self,
        publisher: Publisher,
        team: str,
        reply_to: str,
        job_id: str,
        held: Callable[[], bool],
    ) -> None:
        self._publisher = publisher
        self._team = team
        self._reply_to = reply_to
        self._job_id = job_id
        self._held = held
        """Whether the job's delivery is still open (``Publisher.chunk``)."""
        self.stream = secrets.token_hex(6)
        """This delivery's stream: its chunks and its answer name it (``StreamChunk.stream``)."""
        self._seq = 0
        self._gone = False
        self._cached = False

    async def __call__(self, piece: Piece, model: str, alias: str) -> None:
        if self._gone:
            return  # nobody listens: the job still runs to the end and is accounted
        # The chunk fields the provider sent as text (CHUNK_FIELDS), repeated on the chunk.
        sent: dict[str, Any] = {k: v for k, v in piece.chunk.items() if isinstance(v, str)}
        chunk = StreamChunk(
            job_id=self._job_id,
            seq=self._seq,
            delta=piece.delta,
            model=model,
            model_used=alias,
            cached=self._cached,
            index=piece.index,
            logprobs=piece.logprobs,
            anthropic_events=piece.anthropic_events,
            stream=self.stream,
            **sent,
        )
        self._seq += 1
        if not await self._publisher.chunk(self._team, self._reply_to, chunk, held=self._held):
            self._gone = True
            log.warning(
                "reply queue of streamed job %s is gone or full, or the job's delivery is, "
                "with its connection; not relaying",
                self._job_id,
            )

    async def replay(self, response: dict[str, Any], alias: str) -> None:
        """An answer that was not streamed (a cache hit, served by ``alias``), as its live
        stream's deltas."""
        self._cached = True
        chunk = {k: response[k] for k in CHUNK_FIELDS if k in response}
        # No events for an Anthropic deployment's answer: an Anthropic caller gets the
        # provider's blocks whole, at the end.
        events: list[dict[str, Any]] | None = [] if ANTHROPIC_BODY in response else None
        model = str(response.get("model") or "")
        deltas = replayed_deltas(response)
        if not deltas and events is not None:
            deltas = [Replayed(0, {})]  # still one chunk, naming the model
        for d in deltas:
            piece = Piece(d.delta, d.index, d.logprobs, chunk, anthropic_events=events)
            await self(piece, model, alias)


def relay_for(
    job: ChatJob, reply_to: str | None, publisher: Publisher, held: Callable[[], bool]
) -> StreamRelay | None:
    """The relay of a job that asked to be streamed and has somewhere to stream to, while
    its delivery is ``held``."""
    if not job.stream or not reply_to:
        return None
    return StreamRelay(publisher, job.team, reply_to, job.job_id, held)
