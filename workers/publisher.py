"""Everything a worker publishes, each with a broker confirm before the job is acknowledged."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Protocol

import aiormq
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage

from queuegate.broker import CONNECTION_LOST, Outgoing, json_message, publish, when_connected
from queuegate.messages import StreamChunk, usage_batch_body
from queuegate.metrics import observe_usage_batch
from queuegate.signing import KEY_ID_HEADER, PROOF_HEADER
from queuegate.topology import (
    DEAD_BODY_LIMIT,
    HEADER_DEAD_DETAIL,
    HEADER_DEAD_QUEUE,
    HEADER_DEAD_REASON,
    HEADER_DEAD_TRUNCATED,
    HEADER_DEAD_UNANSWERED,
    HEADER_DEAD_USER,
    HEADER_FIRST_DETAIL,
    HEADER_FIRST_REASON,
    MESSAGE_TYPE_CHUNK,
    MESSAGE_TYPE_RESULT,
    MESSAGE_TYPE_USAGE_BATCH,
    header_text,
)
from workers.usage_batches import UsageBatches

log = logging.getLogger(__name__)

DETAIL_LIMIT = 500

REPLIES_IN_FLIGHT = 256
"""Publishes on the replies channel awaiting their confirms at once; the rest wait their turn.

With about 100 confirms outstanding a publisher already reaches 7-9k messages/s here (DESIGN),
far above a worker's rate. Past its write buffer, aiormq queues a channel's publishes on its
lock, each holding its frames, its own timeout and our stall timer: a worker answering a
thousand jobs in a second (mock at 1,000 ms, 5,000 held) had thousands of them there, 6.5 KB
a publishing job against 3.0 KB waiting here (tracemalloc, 5,000 results at once)."""


class TeamReplies(Protocol):
    async def replies(self, team: str) -> AbstractChannel:
        """The channel, with publisher confirms and ``on_return_raises``, that results and
        deltas of ``team``'s jobs go on (``workers.team_connections``)."""
        ...


class Publisher:
    """Publishes on channels opened with publisher confirms and ``on_return_raises``: results
    and streamed deltas on their team's ``replies`` channel, usage events and dead letters on
    ``channel``.

    A team's results go on the connection its jobs are consumed and acknowledged on: the
    broker then reads a job's acknowledgement with its result's publish and sends their
    confirms with its next deliveries, in one socket's turns. On the worker's own connection,
    apart from them, RabbitMQ spent 0.27-0.36 ms of CPU a job at throughput against 0.17-0.19
    (bench throughput, 1 worker, two runs each alternating), the worker 0.83-0.88 against
    0.72-0.76.

    aiormq matches a returned message to the publish it fails by ``message_id``, and a job's
    result and dead letter both carry the job's id (as do copies of one job): on one channel a
    result returned because its reply queue is gone would fail another copy's dead letter, and
    that job would be taken back. A reply queue is a team's to delete; the usage exchange and
    the dead letters are never missing. Usage events go in batches (``UsageBatches``), each
    under an id of its own.

    A publish that fails because the connection dropped waits up to ``reconnect_wait`` seconds
    for the robust channel to return and is sent again, rather than failing the job: a failed
    job is requeued, and requeues while the broker is away would spend its delivery limit. One
    the broker refuses is sent again for ``nacks_within`` seconds (a quorum queue electing a
    new leader on a cluster, ``queuegate.broker.nack_window``).

    At most REPLIES_IN_FLIGHT results and deltas are in aiormq's hands at once; the others
    wait their turn in ``_reply``, each attempt separately, so the reconnect wait of a publish
    that failed is not spent holding a turn.

    Usage events and dead letters carry ``user_id`` (the worker's broker user): the dead-letter
    tools trust their headers only under an operator's user_id, which no team can forge.
    """

    def __init__(
        self,
        channel: AbstractChannel,
        usage: AbstractExchange,
        dead: AbstractExchange,
        *,
        replies: TeamReplies,
        reconnect_wait: float,
        nacks_within: float = 0.0,
        user_id: str | None,
        keeps_results: Callable[[str], bool],
        bounded: Callable[[str], bool],
        held_full: Callable[[str], bool] = lambda _queue: False,
        accounted: Callable[[list[str]], Awaitable[None]] | None = None,
    ) -> None:
        self._user_id = user_id
        self._keeps_results = keeps_results
        self._bounded = bounded
        self._held_full = held_full
        self._channel = channel
        self._replies = replies
        self._usage = usage
        self._dead = dead
        self._reconnect_wait = reconnect_wait
        self._nacks_within = nacks_within
        self._usage_batches = UsageBatches(self._usage_batch, confirmed=accounted)
        self._replying = asyncio.Semaphore(REPLIES_IN_FLIGHT)

    def _send(
        self,
        publish: Callable[[], Awaitable[None]],
        what: str,
        *,
        channel: AbstractChannel | None = None,
        held: Callable[[], bool] | None = None,
    ) -> Awaitable[None]:
        # Not a coroutine of its own: thousands of jobs can be waiting in here at once.
        return when_connected(
            self._channel if channel is None else channel,
            publish,
            within=self._reconnect_wait,
            what=what,
            nacks_within=self._nacks_within,
            held=held,
        )

    async def result(
        self, team: str, reply_to: str, job_id: str, body: bytes, *, held: Callable[[], bool]
    ) -> bool:
        """Send a ChatResult's JSON of a job of ``team``'s queue to the caller's reply queue,
        on the team's connection; False when that queue no
        longer exists, or is one of a team's (``bounded``) and refuses it: full, its team
        reading none of its results (``QUEUEGATE_REPLY_QUEUE_MAX_BYTES``), or ``held_full``,
        its bound reached with the results its consumer holds unacknowledged counted
        (``workers/held_results.py``), which the broker does not count. The job is then
        answered and accounted all the same (``reply_delivered = false``), not sent back to
        its queue to be refused again and again, nor dead-lettered into the shared
        ``<ns>.dead`` by the thousand. Any other queue's refusal (one the gateway did not
        bound) fails the job, which is tried again up to its delivery limit.

        Persistent only to a queue that ``keeps_results`` (a pipeline's or a batch's named
        results queue, which holds them while nobody reads). A client's own reply queue and a
        front door's are read as results arrive, by the process that named them: persistence
        there cost RabbitMQ 15-30 % more CPU per result under load and 2-3 times as much one
        at a time, its confirm waiting for a disk sync, to keep a result that sits unread
        across a broker restart (none of 800 jobs across two restarts in the chaos test did).
        Such a result is still in the outcome store: the job sent again is answered from it,
        neither called nor counted twice.

        Sent again after a lost connection only while ``held`` (the job's delivery, which is
        on the same team connection, is still open), else the connection's error is raised
        at once: that delivery is void, the broker delivers the job again and that delivery
        announces it, from the stored outcome (a sweep's announcement, held by no delivery,
        is swept again a lease later). Waiting for the connection instead held a worker's
        stop for its whole grace while a team's requests kept closing its connection, and
        sent each result again on every reconnect (about 135 times each in an attack).
        """
        if self._held_full(reply_to):
            log.info(
                "result of job %s not sent: reply queue %s holds its bound, its consumer's "
                "unacknowledged results counted; the job sent again is answered from its "
                "stored outcome",
                job_id,
                reply_to,
            )
            return False
        message = json_message(
            body,
            message_type=MESSAGE_TYPE_RESULT,
            message_id=job_id,
            correlation_id=job_id,
            persistent=self._keeps_results(reply_to),
        )
        channel = await self._replies.replies(team)
        try:
            await self._send(
                lambda: self._reply(channel, reply_to, message),
                f"answering job {job_id}",
                channel=channel,
                held=held,
            )
        except aiormq.exceptions.PublishError:
            log.warning(
                "result of job %s returned: reply queue %s no longer exists", job_id, reply_to
            )
            return False
        except aiormq.exceptions.DeliveryError:
            if not self._bounded(reply_to):
                raise
            log.warning(
                "result of job %s refused: reply queue %s is full (its team reads none of its "
                "results); the job sent again is answered from its stored outcome",
                job_id,
                reply_to,
            )
            return False
        return True

    async def chunk(
        self, team: str, reply_to: str, chunk: StreamChunk, *, held: Callable[[], bool]
    ) -> bool:
        """Send one streamed delta; False when the reply queue no longer exists, or is one
        of a team's and full (its final result is then refused too, or comes when there is
        room: the deltas before it are the reader's to lose), or when the connection is lost
        and the job's delivery with it (``held``, as for ``result``): the job is delivered
        again, and its call runs on to its stored outcome, which answers that delivery.

        Not persistent: a delta is worth nothing after a broker restart, the final result is.
        """
        if self._held_full(reply_to):
            return False
        message = json_message(
            chunk.model_dump_json().encode(),
            message_type=MESSAGE_TYPE_CHUNK,
            correlation_id=chunk.job_id,
            persistent=False,
        )
        channel = await self._replies.replies(team)
        try:
            await self._send(
                lambda: self._reply(channel, reply_to, message),
                f"streaming job {chunk.job_id}",
                channel=channel,
                held=held,
            )
        except (aiormq.exceptions.PublishError, *CONNECTION_LOST):
            return False
        except aiormq.exceptions.DeliveryError:
            if not self._bounded(reply_to):
                raise
            return False
        return True

    async def _reply(self, channel: AbstractChannel, reply_to: str, message: Outgoing) -> None:
        # One attempt, so that a turn is not held while when_connected waits out an outage.
        async with self._replying:
            await publish(channel, message, exchange="", routing_key=reply_to)

    def usage(self, body: bytes, lapsing: str | None = None) -> Awaitable[None]:
        """Send a UsageEvent's JSON to the usage exchange, in the next batch (see
        UsageBatches); done once the broker confirms that batch, whose ``lapsing`` claims
        (the job's, if given) ``accounted`` is then given."""
        return self._usage_batches.add(body, lapsing)

    async def _usage_batch(self, events: list[bytes]) -> None:
        # Its own message id: a returned batch must fail no job's other publish (see above).
        batch_id = uuid.uuid4().hex
        message = json_message(
            usage_batch_body(events),
            message_type=MESSAGE_TYPE_USAGE_BATCH,
            message_id=batch_id,
            user_id=self._user_id,
        )
        await self._send(
            lambda: publish(self._channel, message, exchange=self._usage.name, routing_key=""),
            f"accounting {len(events)} jobs (usage batch {batch_id})",
        )
        observe_usage_batch(len(events))

    async def close(self) -> None:
        """Wait for the usage batch in flight, if any (its jobs are done or cancelled)."""
        await self._usage_batches.close()

    async def dead_letter(
        self,
        original: AbstractIncomingMessage,
        *,
        reason: str,
        detail: str,
        queue: str,
        user: str,
        first: tuple[str, str] | None = None,
        unanswered: bool = False,
    ) -> None:
        """Keep the original job, with why it was refused, in the dead-letter queue.

        Only the worker's own headers go with it (a team's ``x-queuegate-*`` headers stay
        behind), plus the job's API key proof, so that a replay can prove it again. A body
        beyond DEAD_BODY_LIMIT is cut there: what an operator needs is why, not the megabytes.
        ``user`` is who first published the job; ``first`` the reason and detail a replayed job
        was first dead-lettered for; ``unanswered``, that the refusal reached no reply queue
        (none named, or it is gone or full): its caller has no such answer.
        """
        headers: dict[str, str | int] = {
            HEADER_DEAD_REASON: reason,
            HEADER_DEAD_DETAIL: detail[:DETAIL_LIMIT],
            HEADER_DEAD_QUEUE: queue,
            HEADER_DEAD_USER: user,
        }
        if first is not None:
            headers[HEADER_FIRST_REASON], headers[HEADER_FIRST_DETAIL] = first
        if unanswered:
            headers[HEADER_DEAD_UNANSWERED] = 1
        for name in (KEY_ID_HEADER, PROOF_HEADER):
            value = header_text((original.headers or {}).get(name))
            if value is not None:
                headers[name] = value
        body = original.body
        if len(body) > DEAD_BODY_LIMIT:
            headers[HEADER_DEAD_TRUNCATED] = len(body)
            body = body[:DEAD_BODY_LIMIT]
        message = json_message(
            body,
            message_type=original.type or "job",
            message_id=original.message_id,
            correlation_id=original.correlation_id,
            reply_to=original.reply_to,
            user_id=self._user_id,
            headers=headers,
        )
        await self._send(
            lambda: publish(self._channel, message, exchange=self._dead.name, routing_key=queue),
            f"dead-lettering job {original.message_id}",
        )
