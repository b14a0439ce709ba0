"""The front door's way onto the broker: publish a team's job, await or stream its answer.

One per process, opened with the app (``FrontDoor``): one robust connection, one publishing
channel with confirms, and ONE reply queue, ``<ns>.frontdoor.<id>``, declared here with an
expiry (a dead process's queue goes away) and a length bound, consumed once on a channel of
its own (a consume the broker refuses, the queue gone, closes only that one). Replies are
matched to waiters by job id, the queue kept across reconnects as ``GatewayClient`` keeps
its own (``producer.replies.Inbox`` and ``ReplyQueue``)::

    await bridge.submit(job, caller)                  # returns once the broker confirms it
    result = await bridge.wait(job.job_id, timeout)   # ChatResult; TimeoutError past timeout

    stream = bridge.stream(job, caller, timeout)      # publishes when iterated
    async for chunk in stream: ...                    # StreamChunks, then stream.result

    await bridge.publish(job, caller)                 # fire and forget (async jobs)

Each job is signed with the caller's key exactly as ``GatewayClient(api_key=...)`` signs it
(``queuegate.signing``) and published under the front door's own broker user; the worker
proves the key and records ``frontdoor:<user>/api_key:<key id>`` (workers/identity.py).
Several requests may wait for one job id (a retry under the same Idempotency-Key): each
gets the result (each stream every chunk), and the job is forgotten when the last of them
stops waiting. A job submitted ``bound`` (its id bound to its request before publishing,
``Outcomes.bind``) is never answered ``idempotency_conflict`` here: such an answer is another
request's, published under the id past the binding, and is dropped. Nor is one refusing the
job ``deadline_exceeded`` uncalled, nothing billed, while the latest deadline it was
published with here has yet to pass: that answers an earlier delivery of it, published with
an earlier deadline (a retry under its Idempotency-Key publishes an expired job again), and
the delivery waited for is still to be answered.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from datetime import UTC, datetime
from typing import Self

from aio_pika.abc import AbstractExchange, AbstractRobustChannel, AbstractRobustConnection

from frontdoor.auth import Caller
from producer.client import job_message, publish_to_team
from producer.replies import Inbox, ReplyingConnection, ReplyQueue
from producer.streams import ChatStream
from queuegate.broker import nack_window
from queuegate.errors import ConfigError
from queuegate.messages import ChatJob, ChatResult
from queuegate.settings import Settings
from queuegate.topology import Topology
from workers.outcome import refused_late_uncalled

log = logging.getLogger(__name__)


class Bridge(ReplyingConnection):
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._topology = Topology.of(settings)
        self._process_id = uuid.uuid4().hex
        self.reply_queue = self._topology.frontdoor_queue(self._process_id)
        self._user_id = settings.amqp_user
        self._inbox = Inbox(keep_unexpected=False, ignore=self._ignored)
        self._replies = ReplyQueue(self._inbox, declare=self._declare, delete=self._delete)
        self._waiting: Counter[str] = Counter()
        self._bound: set[str] = set()
        self._deadlines: dict[str, datetime | None] = {}
        """The latest deadline each job waited for was published with here (None: none)."""
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._exchange: AbstractExchange | None = None

    async def __aenter__(self) -> Self:
        if self._user_id not in self._settings.frontdoor:
            raise ConfigError(
                f"the front door publishes as broker user {self._user_id!r}, which "
                "QUEUEGATE_FRONTDOOR_USERS does not name: workers would refuse its jobs; add it"
            )
        await self._connect(self._settings.amqp_url, name="frontdoor")
        return self

    async def _setup(self, connection: AbstractRobustConnection) -> None:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        self._channel = channel
        # Declared, not looked up: the front door may start before any worker or team.
        self._exchange = await self._topology.declare_jobs_exchange(channel)
        # Not on ``channel`` (ReplyQueue.start): a refused consume closes its channel,
        # which would lose the publishes on it.
        await self._replies.start(connection)

    @property
    def connected(self) -> bool:
        return (
            self._connection is not None
            and not self._connection.is_closed
            and self._channel is not None
            and not self._channel.is_closed
        )

    async def _declare(self, channel: AbstractRobustChannel) -> str:
        queue = await self._topology.declare_frontdoor_queue(
            channel,
            self._process_id,
            expires_s=self._settings.reply_queue_expires,
            max_length=self._settings.reply_queue_max_length,
        )
        return queue.name

    async def _delete(self, channel: AbstractRobustChannel) -> None:
        await channel.queue_delete(self.reply_queue)

    async def publish(self, job: ChatJob, caller: Caller) -> None:
        """Publish the team's job, signed with its key; return once the broker confirms it.

        Raises QueueFull (the team's queue is at its quota), PublishRefused (no queue for the
        team) or ServiceUnavailable (the broker is away longer than ``reconnect_wait``)."""
        if self._channel is None or self._exchange is None:
            raise RuntimeError("use the bridge inside `async with`")
        await publish_to_team(
            self._channel,
            self._exchange.name,
            job_message(
                job, reply_to=self.reply_queue, user_id=self._user_id, api_key=caller.api_key
            ),
            job,
            within=self._settings.reconnect_wait,
            nacks_within=nack_window(self._settings.amqp_url),
        )

    async def submit(self, job: ChatJob, caller: Caller, *, bound: bool = False) -> None:
        """Publish the job and expect its result (take it with ``wait``); ``bound``: its id
        is bound to this very request (see the module's docstring)."""
        self._expect(job, bound=bound)
        try:
            await self.publish(job, caller)
        except BaseException:
            self._done(job.job_id)
            raise

    def give_up(self) -> None:
        """End every request's wait for its job's result or next chunk (``Inbox.give_up``)."""
        self._inbox.give_up()

    async def wait(self, job_id: str, timeout: float) -> ChatResult:
        """The result of a submitted job; TimeoutError when none came within ``timeout``."""
        try:
            return await self._inbox.wait(job_id, timeout)
        finally:
            self._done(job_id)

    def stream(
        self, job: ChatJob, caller: Caller, timeout: float | None, *, bound: bool = False
    ) -> ChatStream:
        """The job's chunks then its result (``producer.streams.ChatStream``), published when
        iterated; ``close_stream`` once done with it, however it ended."""

        async def start() -> None:
            self._inbox.open(stream)
            await self.submit(job, caller, bound=bound)

        stream = ChatStream(job.job_id, start, timeout)
        return stream

    def close_stream(self, job_id: str) -> None:
        if self._waiting[job_id] > 0:
            self._done(job_id)

    def _expect(self, job: ChatJob, *, bound: bool) -> None:
        job_id = job.job_id
        self._waiting[job_id] += 1
        if bound:
            self._bound.add(job_id)
        latest = self._deadlines.get(job_id, job.deadline)
        self._deadlines[job_id] = (
            None if latest is None or job.deadline is None else max(latest, job.deadline)
        )
        self._inbox.expect(job_id)

    def _done(self, job_id: str) -> None:
        self._waiting[job_id] -= 1
        if self._waiting[job_id] <= 0:
            del self._waiting[job_id]
            self._bound.discard(job_id)
            del self._deadlines[job_id]
            self._inbox.forget(job_id)

    def _ignored(self, result: ChatResult) -> bool:
        return self._foreign(result) or self._stale(result)

    def _stale(self, result: ChatResult) -> bool:
        """Whether ``result`` refuses an earlier delivery of its job late, uncalled: the
        latest one published here is not late yet (see the module's docstring). A worker
        whose clock runs ahead may refuse that one too: its caller's own wait ends it then."""
        if result.job_id not in self._deadlines or not refused_late_uncalled(result):
            return False
        deadline = self._deadlines[result.job_id]
        if deadline is not None and datetime.now(UTC) >= deadline:
            return False
        log.info(
            "dropped a late refusal of job %s: it answers an earlier delivery of the job, "
            "published with an earlier deadline than the one waited for here",
            result.job_id,
        )
        return True

    def _foreign(self, result: ChatResult) -> bool:
        """Whether ``result`` answers another request than the one bound to its job id."""
        if result.error is None or result.error.code != "idempotency_conflict":
            return False
        if result.job_id not in self._bound:
            return False
        log.warning(
            "dropped an idempotency_conflict answer to job %s: its id is bound to the request "
            "waiting here, so it answers another one",
            result.job_id,
        )
        return True


__all__ = ["Bridge"]
