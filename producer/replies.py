"""Matching replies to jobs: one future per job id, duplicates dropped, no polling.

``Inbox`` reads the messages of a reply queue (results and stream chunks) and hands each to
its waiter; ``GatewayClient`` and the HTTP front door both consume their queue through one.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable

from aiormq.abc import DeliveredMessage
from pydantic import ValidationError

from producer.streams import ChatStream, StreamBook
from queuegate.broker import settle
from queuegate.messages import ChatResult, StreamChunk
from queuegate.topology import MESSAGE_TYPE_CHUNK, MESSAGE_TYPE_RESULT

log = logging.getLogger(__name__)

REPLY_PREFETCH = 1000
"""Unacknowledged replies a reply queue's consumer holds: acknowledged once handed over, so
one in flight when the connection drops is redelivered."""

SEEN_LIMIT = 100_000
"""Answered job ids remembered to drop redelivered duplicates; older ones are forgotten."""


class ReplyBook:
    """A future per job id, created when the job is published or its result arrives first.

    The future stays until someone takes its result, so a result that lands before
    ``wait`` is called is not lost. ``keep_unexpected=False`` drops the result of a job
    nobody expects (or that was forgotten): a server whose callers come and go would
    otherwise keep every abandoned job's result.
    """

    def __init__(self, *, keep_unexpected: bool = True) -> None:
        self._futures: dict[str, asyncio.Future[ChatResult]] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._keep_unexpected = keep_unexpected
        self.duplicates = 0

    def expect(self, job_id: str) -> asyncio.Future[ChatResult]:
        future = self._futures.get(job_id)
        if future is None:
            future = self._futures[job_id] = asyncio.get_running_loop().create_future()
        return future

    def deliver(self, result: ChatResult) -> None:
        """Record a result; one that duplicates a result already delivered is counted."""
        if result.job_id in self._seen:
            self.duplicates += 1
            # Someone waits for it again (a retry of the same job): answer them too.
            waiting = self._futures.get(result.job_id)
            if waiting is not None and not waiting.done():
                waiting.set_result(result)
            return
        self._seen[result.job_id] = None
        if len(self._seen) > SEEN_LIMIT:
            self._seen.popitem(last=False)
        if not self._keep_unexpected and result.job_id not in self._futures:
            return
        future = self.expect(result.job_id)
        if not future.done():
            future.set_result(result)

    async def wait(self, job_id: str, timeout: float | None) -> ChatResult:
        """The job's result; on TimeoutError the job stays expected, for a later wait."""
        future = self.expect(job_id)
        # asyncio.wait leaves the future be on a timeout or a cancel, in one hop fewer
        # than wait_for around a shield.
        await asyncio.wait((future,), timeout=timeout)
        if not future.done():
            raise TimeoutError
        self._futures.pop(job_id, None)
        return future.result()

    def forget(self, job_id: str) -> None:
        future = self._futures.pop(job_id, None)
        if future is not None:
            future.cancel()


class Inbox:
    """The waiters of one reply queue: a future per job, the streams of a streamed job.

    Pass ``handle`` as the queue's consumer callback (``queuegate.broker.consume``, with
    ``prefetch=REPLY_PREFETCH``); each reply is acknowledged once handed over (a redelivered
    one is dropped as a duplicate)::

        inbox.expect(job.job_id)            # before publishing the job
        result = await inbox.wait(job.job_id, timeout)
    """

    def __init__(
        self,
        *,
        keep_unexpected: bool = True,
        ignore: Callable[[ChatResult], bool] | None = None,
    ) -> None:
        self.replies = ReplyBook(keep_unexpected=keep_unexpected)
        self.streams = StreamBook()
        self._keep_unexpected = keep_unexpected
        self._ignore = ignore
        """Results that reach this queue but answer none of its waiters: dropped."""

    def expect(self, job_id: str) -> None:
        self.replies.expect(job_id)

    async def wait(self, job_id: str, timeout: float | None) -> ChatResult:
        """The job's result; TimeoutError when none came within ``timeout``."""
        return await self.replies.wait(job_id, timeout)

    def open(self, stream: ChatStream) -> None:
        """Route the job's chunks, then its result, to ``stream``."""
        self.streams.open(stream)

    def forget(self, job_id: str) -> None:
        """Stop waiting for the job (its stream too)."""
        self.replies.forget(job_id)
        self.streams.close(job_id)

    async def handle(self, message: DeliveredMessage) -> None:
        properties, tag = message.header.properties, message.delivery_tag
        assert tag is not None  # a consumer's delivery always has one
        try:
            if properties.message_type == MESSAGE_TYPE_RESULT:
                result = ChatResult.model_validate_json(message.body)
                if self._ignore is None or not self._ignore(result):
                    self.replies.deliver(result)
                    # A duplicate ends streams too: one opened after the first copy came.
                    if self.streams.finish(result) and self._keep_unexpected:
                        # Nobody waits for a streamed job's future. (An owner that drops
                        # unexpected results forgets each job itself, once no request waits
                        # for it, streamed or not.)
                        self.replies.forget(result.job_id)
            elif properties.message_type == MESSAGE_TYPE_CHUNK:
                self.streams.chunk(StreamChunk.model_validate_json(message.body))
        except ValidationError:
            log.warning(
                "dropped a malformed %s for job %s",
                properties.message_type,
                properties.correlation_id,
            )
        # The book drops a redelivered reply as a duplicate.
        await settle(
            message.channel.basic_ack(tag),
            f"acknowledge the reply to {properties.correlation_id}",
            log,
        )
