"""Matching replies to jobs: one future per job id, duplicates dropped, no polling.

``Inbox`` reads the messages of a reply queue (results and stream chunks) and hands each to
its waiter; ``ReplyQueue`` keeps that queue there, consumed into the inbox, across reconnects,
and removes it at the end. ``GatewayClient`` and the HTTP front door both hold their queue so,
on a connection of their own (``ReplyingConnection``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Coroutine
from types import TracebackType
from typing import Any

import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aiormq import spec
from aiormq.abc import DeliveredMessage
from pydantic import ValidationError

from producer.streams import ChatStream, StreamBook
from queuegate.broker import CONNECTION_LOST, Consumer, Outgoing, connect, consume, settle
from queuegate.errors import AnswerTaken, ClientError, GaveUp, ServiceUnavailable
from queuegate.messages import ChatResult, StreamChunk
from queuegate.signing import message_digest
from queuegate.topology import MESSAGE_TYPE_CHUNK, MESSAGE_TYPE_RESULT

log = logging.getLogger(__name__)

REPLY_PREFETCH = 1000
"""Unacknowledged replies a reply queue's consumer holds: acknowledged once handed over, so
one in flight when the connection drops is redelivered."""

ACK_LINGER = 0.05
"""Seconds a reply handed over waits to be acknowledged together with those that follow it,
in one ``basic.ack(multiple)``. Acknowledged one by one, each reply cost the client a frame
and a socket write queued just before its next job's publish (one at a time, the next job
crossed the broker behind it), and the broker an ack to apply. A reply not yet acknowledged
when the connection drops is delivered again and dropped as a duplicate, as one in flight is."""
ACK_EVERY = REPLY_PREFETCH // 4
"""Replies handed over that are acknowledged at once, linger or not: far below the prefetch,
so the broker never stops delivering for want of acks."""

SEEN_LIMIT = 100_000
"""Job ids remembered, answered (to drop redelivered duplicates) or let go (to drop their
answers as they come); older ones are forgotten."""
REDECLARE_FIRST, REDECLARE_MAX = 0.5, 10.0
"""Seconds between tries to declare a deleted reply queue again: the first, doubling to the
last (the gateway may be unable to declare it for a while: its Redis away)."""
CLOSE_TIMEOUT = 5.0
"""Seconds a closing owner tries to remove its reply queue before leaving it to expire."""

UNANSWERED: tuple[type[BaseException], ...] = (
    *CONNECTION_LOST,
    aiormq.exceptions.AMQPError,
    ClientError,
    ServiceUnavailable,
)
"""What opening or removing a reply queue meets while the broker (or the gateway that
declares a team's queues) cannot answer."""


class ReplyBook:
    """A future per job id, created when the job is published or its result arrives first.

    The future stays until someone takes its result, so a result that lands before
    ``wait`` is called is not lost. ``keep_unexpected=False`` drops the result of a job
    nobody expects (or that was forgotten): a server whose callers come and go would
    otherwise keep every abandoned job's result.

    A job expected with its request's digest (``queuegate.messages.request_digest``) takes
    only a result answering that request, or refusing a message this side published for it
    (one naming its ``message_digest``): under a used id a different request is answered
    ``idempotency_conflict`` on the same queue, anyone publishing as the team may send a
    message under the id that the workers refuse unread, and a named queue may hold the
    answer to an earlier run's request under the id. Such a result, and one naming nothing
    (an older worker's), is dropped (counted in ``strays``).
    """

    def __init__(self, *, keep_unexpected: bool = True) -> None:
        self._futures: dict[str, asyncio.Future[ChatResult]] = {}
        self._requests: dict[str, list[str]] = {}
        """What a result of each job id may name while it is expected: the digest of the
        request it was published with, then those of the messages that carried it."""
        self._unnamed: dict[str, Outgoing] = {}
        """The last message a job was published in, its digest not yet worked out: only a
        refusal names it (``_name``), and most jobs are answered, not refused."""
        self._waiters: dict[str, set[asyncio.Future[ChatResult]]] = {}
        """Each wait's own future, settled along with its job's (``_settle``): awaited, not
        the job's, so that a wait that times out or is cancelled cancels nothing another
        wait of the job awaits."""
        self._handles: dict[str, int] = {}
        """The handles of each job published here that have not taken its answer (nor been
        dropped): its future keeps its result until the last has (a duplicate of it, the
        answer to its second publish, may have come already, and is not handed over again),
        whatever a wait by id or a stream of the job took meanwhile."""
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._let_go: OrderedDict[str, None] = OrderedDict()
        """Jobs whose every handle was dropped before their answer came (``unexpect``): the
        answer is dropped as it comes, not kept for a wait by id nobody will make (a client
        that submitted and dropped its handles kept every answer for its whole life)."""
        self._keep_unexpected = keep_unexpected
        self.duplicates = 0
        self.strays = 0

    def expect(
        self,
        job_id: str,
        request: str | None = None,
        message: Outgoing | None = None,
        *,
        handle: bool = True,
    ) -> asyncio.Future[ChatResult]:
        """The job's future; ``request``, its digest, and ``message``, the message it is
        published in, when this side publishes it (before: a refusal may come back before
        the broker's confirm), for a handle (``unexpect`` once it has the answer), or for
        no handle (``handle=False``: a job published to be awaited by id)."""
        self._let_go.pop(job_id, None)  # expected again: its answer is wanted
        if request is not None:
            names = self._requests.get(job_id)
            if names is None or names[0] != request:
                names = self._requests[job_id] = [request]
                self._unnamed.pop(job_id, None)
            # Each message of the request published under the id (a retry's may differ):
            # the one before named now, so a job published again holds one name a message.
            if message is not None:
                self._name(job_id, names)
                self._unnamed[job_id] = message
                if handle:
                    self._handles[job_id] = self._handles.get(job_id, 0) + 1
        future = self._futures.get(job_id)
        if future is not None and future.done() and self._answers_another(future.result()):
            # Arrived before the job was published: the answer to an earlier request.
            self.strays += 1
            future = None
        if future is None:
            future = self._futures[job_id] = asyncio.get_running_loop().create_future()
        return future

    def request(self, job_id: str) -> str | None:
        """The digest of the request the job id is expected with, if any."""
        names = self._requests.get(job_id)
        return None if names is None else names[0]

    def _answers_another(self, result: ChatResult) -> bool:
        names = self._requests.get(result.job_id)
        if names is None or result.request == names[0]:
            return False
        self._name(result.job_id, names)
        return result.request not in names

    def _name(self, job_id: str, names: list[str]) -> None:
        """Add the digest of the job's message not yet named to its ``names``."""
        message = self._unnamed.pop(job_id, None)
        if message is not None:
            digest = message_digest(message.body, message.properties)
            if digest not in names:
                names.append(digest)

    def deliver(self, result: ChatResult) -> bool:
        """Record a result; one that duplicates a result already delivered is counted, and
        one answering another request than the job id's is dropped: False then."""
        if self._answers_another(result):
            self.strays += 1
            return False
        if result.job_id in self._seen:
            self.duplicates += 1
            # Someone waits for it again (a retry of the same job): answer them too.
            waiting = self._futures.get(result.job_id)
            if waiting is not None and not waiting.done():
                self._settle(result.job_id, waiting, result)
            return True
        _remember(self._seen, result.job_id)
        let_go = result.job_id in self._let_go
        self._let_go.pop(result.job_id, None)
        if result.job_id not in self._futures and (not self._keep_unexpected or let_go):
            return True
        future = self.expect(result.job_id)
        if not future.done():
            self._settle(result.job_id, future, result)
        return True

    def _settle(
        self, job_id: str, future: asyncio.Future[ChatResult], result: ChatResult | None
    ) -> None:
        """Give the job's future ``result`` (None: cancel it), and each wait's future too."""
        waiters = self._waiters.get(job_id, ())
        if result is None:
            future.cancel()
            for waiter in waiters:
                waiter.cancel()
            return
        future.set_result(result)
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(result)

    async def wait(self, job_id: str, timeout: float | None) -> ChatResult:
        """The job's result; on TimeoutError the job stays expected, for a later wait.
        AnswerTaken, at once, for a job answered here and forgotten since: its answer is not
        kept after it was taken, and no other comes (a wait for it waited out its timeout)."""
        if job_id in self._seen and job_id not in self._futures:
            raise AnswerTaken(job_id)
        future = self.expect(job_id)
        if not future.done():  # a result already here is taken without a wait's task
            # A future of this wait's own, settled by ``_settle`` as the job's is: the result
            # wakes this task in the turn it arrives, where a wait on the job's future
            # (asyncio.wait, or a shield) took a turn more, through a callback of its own.
            future = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(job_id, set()).add(future)
            try:
                async with asyncio.timeout(timeout):
                    await future
            finally:
                waiters = self._waiters[job_id]
                waiters.discard(future)
                if not waiters:
                    del self._waiters[job_id]
        self.drop(job_id)
        return future.result()

    def drop(self, job_id: str) -> bool:
        """The job's answer taken by a wait or a stream: forgotten, and True then, unless a
        handle of the job has not taken it yet."""
        if self._handles.get(job_id):
            return False
        self.forget(job_id)
        return True

    def unexpect(self, job_id: str) -> bool:
        """One handle of the job's done with it: its result taken, or never to come (its
        publish failed, or the handle was dropped unawaited). The job is forgotten with its
        last, and True then, unless a wait by id waits for it (which forgets it once
        answered); until then its future keeps its result for the others."""
        left = self._handles.pop(job_id, 0) - 1
        if left > 0:
            self._handles[job_id] = left
            return False
        if self._waiters.get(job_id):
            return False
        future = self._futures.get(job_id)
        if future is None or not future.done():
            _remember(self._let_go, job_id)
        self.forget(job_id)
        return True

    def forget(self, job_id: str) -> None:
        self._handles.pop(job_id, None)
        self._requests.pop(job_id, None)
        self._unnamed.pop(job_id, None)
        future = self._futures.pop(job_id, None)
        if future is not None:
            self._settle(job_id, future, None)

    def give_up(self) -> None:
        """End every wait under way with ``GaveUp``: its job runs on, unawaited."""
        for job_id, waiters in self._waiters.items():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(GaveUp(job_id))


def _remember(ids: OrderedDict[str, None], job_id: str) -> None:
    """Add ``job_id`` to ``ids``, forgetting the oldest past ``SEEN_LIMIT``."""
    ids[job_id] = None
    if len(ids) > SEEN_LIMIT:
        ids.popitem(last=False)


class ReplyAcks:
    """Acknowledges the replies of one queue together: every reply handed over on a channel,
    ``ACK_LINGER`` after the first of them (or at ``ACK_EVERY``), with one multiple ack of the
    last one's tag.

    A multiple ack covers every unacknowledged delivery up to its tag on the channel: the
    channel must carry no other consumer's acknowledged deliveries (a reply queue's own
    channel, opened by ``ReplyQueue.start``, carries nothing else).
    Replies are handed over in the order they are delivered, each at once (``Inbox.handle``
    does not wait); one whose handling failed is acknowledged with the rest (it would fail
    again). A channel that closed takes its unacknowledged replies back to the queue: they are
    delivered again on the next, and dropped as duplicates.

    One ack is on its way at a time, the next sent once it is written: two multiple acks must
    reach the broker in the order of their tags, or the later one settles the earlier one's
    tag first and the broker refuses that (PRECONDITION_FAILED - unknown delivery tag), closing
    the channel and failing every publish on it. Sent from tasks of their own they could pass
    each other: aiormq writes through a queue of ten frames, an ack waits there for a slot
    while RabbitMQ's flow control leaves the connection unread, and asyncio.Queue keeps no
    order among waiting writers (one woken can lose its slot to a newcomer and wait again).
    """

    def __init__(self) -> None:
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._last = 0
        """The tag of the last reply handed over on ``_channel``, not yet acknowledged; 0: none."""
        self._waiting = 0
        self._timer: asyncio.TimerHandle | None = None
        self._due: deque[tuple[aiormq.abc.AbstractChannel, int]] = deque()
        """Acks to send, in order, after the one on its way."""
        self._sender: asyncio.Task[None] | None = None

    def handed_over(self, channel: aiormq.abc.AbstractChannel, tag: int) -> None:
        if channel is not self._channel:
            self.flush()
            self._channel = channel
        self._last = tag
        self._waiting += 1
        if self._waiting >= ACK_EVERY:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(ACK_LINGER, self.flush)

    def flush(self) -> None:
        """Acknowledge every reply handed over so far."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        last, self._last, self._waiting = self._last, 0, 0
        if self._channel is None or not last:
            return
        self._due.append((self._channel, last))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send())

    async def _send(self) -> None:
        try:
            while self._due:
                channel, tag = self._due.popleft()
                # Those due on the same channel meanwhile: the last one's tag covers them all.
                while self._due and self._due[0][0] is channel:
                    tag = self._due.popleft()[1]
                what = f"acknowledge the replies up to delivery {tag}"
                await settle(channel.basic_ack(tag, multiple=True), what, log)
        finally:
            self._sender = None

    async def close(self) -> None:
        """Acknowledge what is waiting, and wait until it is sent."""
        self.flush()
        if self._sender is not None:
            # Not cancelled with its waiter (a timed-out close): others' acks may follow.
            await asyncio.wait((self._sender,))


class Inbox:
    """The waiters of one reply queue: a future per job, the streams of a streamed job.

    Pass ``handle`` as the queue's consumer callback (``queuegate.broker.consume``, with
    ``prefetch=REPLY_PREFETCH``); each reply is acknowledged once handed over, together with
    the others handed over within ``ACK_LINGER`` (a redelivered one is dropped as a
    duplicate); ``acks.close()`` acknowledges those still waiting::

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
        self.acks = ReplyAcks()
        self._keep_unexpected = keep_unexpected
        self._ignore = ignore
        """Results that reach this queue but answer none of its waiters: dropped."""

    def expect(
        self,
        job_id: str,
        request: str | None = None,
        message: Outgoing | None = None,
        *,
        handle: bool = True,
    ) -> None:
        self.replies.expect(job_id, request, message, handle=handle)

    def wait(self, job_id: str, timeout: float | None) -> Coroutine[Any, Any, ChatResult]:
        """The job's result, to await; TimeoutError when none came within ``timeout``.

        The book's own wait, not a coroutine around it: one coroutine fewer for each result
        a client awaits."""
        return self.replies.wait(job_id, timeout)

    def open(self, stream: ChatStream) -> None:
        """Route the job's chunks, then its result, to ``stream``."""
        self.streams.open(stream)

    def give_up(self) -> None:
        """End every wait for a result or a chunk with ``GaveUp``, as the client stops: a
        front door whose grace ends answers each such caller, naming its job, rather than
        being cut with its requests (a bare 500, which the SDKs retry as a new job)."""
        self.replies.give_up()
        self.streams.give_up()

    def forget(self, job_id: str) -> None:
        """Stop waiting for the job (its stream too)."""
        self.replies.forget(job_id)
        self.streams.close(job_id)

    def unexpect(self, job_id: str, *, handle: bool = True) -> None:
        """Stop waiting for the job for one of its handles (or a stream: not ``handle``) whose
        publish failed: for good with the last (``ReplyBook.unexpect``), its streams too."""
        if self.replies.unexpect(job_id) if handle else self.replies.drop(job_id):
            self.streams.close(job_id)

    async def handle(self, message: DeliveredMessage) -> None:
        properties, tag = message.header.properties, message.delivery_tag
        assert tag is not None  # a consumer's delivery always has one
        try:
            if properties.message_type == MESSAGE_TYPE_RESULT:
                result = ChatResult.model_validate_json(message.body)
                # A stray ends no stream either. A duplicate does: one opened after the
                # first copy came.
                if (
                    (self._ignore is None or not self._ignore(result))
                    and self.replies.deliver(result)
                    and self.streams.finish(result)
                    and self._keep_unexpected
                ):
                    # Nobody waits for a streamed job's future but a handle of the same
                    # request submitted meanwhile. (An owner that drops unexpected results
                    # forgets each job itself, once no request waits for it, streamed or not.)
                    self.replies.drop(result.job_id)
            elif properties.message_type == MESSAGE_TYPE_CHUNK:
                self.streams.chunk(StreamChunk.model_validate_json(message.body))
        except ValidationError:
            log.warning(
                "dropped a malformed %s for job %s",
                properties.message_type,
                properties.correlation_id,
            )
        # The book drops a redelivered reply as a duplicate.
        self.acks.handed_over(message.channel, tag)


class ReplyQueue:
    """One reply queue on a robust channel of its own, consumed into ``inbox``::

        replies = ReplyQueue(inbox, declare=..., delete=...)
        name = await replies.start(connection)   # declared, consumed: the jobs' reply_to
        ...
        await replies.stop()                     # no longer consumed, and deleted

    ``declare(channel)`` makes sure the queue is there and gives its name: declared on the
    channel itself, or asked of the gateway for a team's queue. Each time the channel comes
    back after a lost connection the queue is declared again (it may have expired meanwhile)
    and consumed again; so it is when the broker cancels the consumer because the queue was
    deleted (an operator, a cluster's node lost); either is tried again with backoff until
    it is done (the gateway may be unable to declare it for a while), one attempt at a time.
    ``start`` opens a channel of its own for the queue on the owner's connection, never the
    one jobs are published on: the broker refuses a consume of a queue gone (NOT_FOUND) by
    closing its channel, which would lose the publishes on it (those awaiting their confirm
    failing with the refusal, those behind the consume sent again). ``delete`` removes it
    at ``stop``; None leaves it (a named queue that keeps results for the next owner): then
    nothing is sent at ``stop``, and the consumer ends with the connection. Should the broker
    be away at ``stop``, the queue expires by itself.
    """

    def __init__(
        self,
        inbox: Inbox,
        *,
        declare: Callable[[AbstractRobustChannel], Awaitable[str]],
        delete: Callable[[AbstractRobustChannel], Awaitable[None]] | None = None,
    ) -> None:
        self._inbox = inbox
        self._declare = declare
        self._delete = delete
        self._name: str | None = None
        self._channel: AbstractRobustChannel | None = None
        self._consumer: Consumer | None = None
        self._reopening: asyncio.Task[None] | None = None
        """The one attempt under way to declare and consume the queue again, if any."""
        self._unanswered = False
        """Whether attempts have failed since the queue was last consumed."""
        self._delay = REDECLARE_FIRST
        """Seconds the next failed attempt waits before the one after it."""
        self._stopped = False

    @property
    def name(self) -> str:
        if self._name is None:
            raise RuntimeError("start the reply queue first")
        return self._name

    async def start(self, connection: AbstractRobustConnection) -> str:
        """Open the queue's channel on ``connection`` (no confirms: nothing is published on
        it), declare the queue and consume it, now and whenever the channel comes back."""
        channel = await connection.channel(publisher_confirms=False)
        await self._open(channel)
        self._channel = channel
        channel.reopen_callbacks.add(self._on_reopen)
        return self.name

    async def stop(self) -> None:
        self._stopped = True
        if self._reopening is not None:
            self._reopening.cancel()
        # Before the consumer goes: a named queue would give the replies handed over but not
        # yet acknowledged to its next owner again.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._inbox.acks.close()
        if self._delete is None or self._channel is None:
            return
        with contextlib.suppress(*UNANSWERED, TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                # The consumer first, so the broker does not cancel it under us.
                if self._consumer is not None:
                    await self._consumer.cancel()
                await self._delete(self._channel)

    async def _open(self, channel: AbstractRobustChannel) -> None:
        self._name = await self._declare(channel)
        self._consumer = await consume(
            channel, self._name, self._inbox.handle, prefetch=REPLY_PREFETCH
        )
        # Results sent to a deleted queue come back to the workers unrouted: declare it again.
        self._consumer.channel.on_consumer_cancel_callbacks.add(self._on_cancelled)

    def _on_cancelled(self, frame: spec.Basic.Cancel) -> None:
        consumer, channel = self._consumer, self._channel
        if consumer is None or frame.consumer_tag != consumer.tag or channel is None:
            return
        if self._stopped:
            return
        log.warning(
            "the broker cancelled the consumer of reply queue %s (was it deleted?): declaring "
            "it again and consuming",
            self._name,
        )
        # Not awaited: this runs in the channel's reader, and the declare may be asked of the
        # gateway on this very channel.
        self._reopen_soon(channel)

    async def _on_reopen(self, channel: AbstractRobustChannel | None) -> None:
        # Not awaited here: the channel's restore waits for its reopen callbacks, and a
        # queue asked of the gateway is answered on this very channel.
        if channel is not None:
            self._reopen_soon(channel)

    def _reopen_soon(self, channel: AbstractRobustChannel) -> None:
        # One attempt at a time: one still under way (a cancel's backoff when the connection
        # came back, an earlier reconnect's) would consume the queue a second time beside it.
        if self._reopening is not None:
            self._reopening.cancel()
        self._reopening = asyncio.create_task(self._reopen(channel))

    async def _reopen(self, channel: AbstractRobustChannel) -> None:
        """Declare the queue and consume it again, with backoff until it is done: given up
        after one failure (the gateway unable to declare it for a moment), every job awaiting
        its result would time out though the broker was back."""
        while not self._stopped:
            try:
                await self._open(channel)
            except UNANSWERED as exc:
                if not self._unanswered:
                    self._unanswered = True  # once an outage, not at every try
                    log.warning(
                        "could not consume reply queue %s again (%s); trying again with "
                        "backoff up to %.0f s",
                        self._name,
                        exc,
                        REDECLARE_MAX,
                    )
            else:
                if self._unanswered:
                    self._unanswered = False
                    log.info("consuming reply queue %s again", self._name)
                self._delay = REDECLARE_FIRST
                return
            # Kept across attempts, so a channel the broker closed at a refused consume
            # (which starts a new attempt as it reopens) does not reset the backoff.
            delay, self._delay = self._delay, min(self._delay * 2, REDECLARE_MAX)
            await asyncio.sleep(delay)


class ReplyingConnection(ABC):
    """A broker connection of its owner's own with its reply queue on it, opened by
    ``_connect`` and closed on leaving ``async with``: ``GatewayClient`` and the front door's
    ``Bridge``. Each sets ``_replies`` and ``_connection = None`` and opens its channels and
    starts ``_replies`` in ``_setup``; leaving stops the queue first, while the connection
    can still remove it."""

    _connection: AbstractRobustConnection | None
    _replies: ReplyQueue

    async def _connect(self, url: str, *, name: str) -> None:
        """Connect to ``url`` and ``_setup`` the connection; closed again should that fail, as
        ``async with`` then never calls ``__aexit__``."""
        self._connection = await connect(url, name=name)
        try:
            await self._setup(self._connection)
        except BaseException:
            await self._connection.close()
            raise

    @abstractmethod
    async def _setup(self, connection: AbstractRobustConnection) -> None:
        """Open the owner's channels and start ``_replies`` on ``connection``."""

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._connection is None:
            return
        await self._replies.stop()
        await self._connection.close()
