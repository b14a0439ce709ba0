"""Each team's broker connection in a worker: its jobs are consumed and settled there, their
results and streamed deltas published there, and the answers to its control requests.

A team can make RabbitMQ 3.10 close a connection that serves it (541 INTERNAL_ERROR), by
what it publishes with its own credentials:

- a job with a malformed ``x-death`` header that expires in its queue restarts the team's
  quorum queue (README: A broker fault a team can reach), which may then deliver to a
  consumer tag the channel no longer knows: the broker closes that channel's connection;
- a control request whose ``reply_to`` is a direct reply-to name the broker cannot decode
  crashes the channel its answer is published on (``pid_recomposition:from_binary``).

On a connection of the worker's shared by every team, either closed every team's consumers
with it: every team's jobs were redelivered and answered seconds late. On the team's own,
only that team's jobs held by this worker come back; the connection reconnects on its own
(robust) and the worker consumes that team's queue again (``on_reopen``). Usage events (in
batches of every team's jobs) and dead letters stay on the worker's own connection: they go
to the gateway's exchanges, not to a name the team chose.

A team's connection is opened when the worker starts consuming its jobs, publishes a result
of one (a job answered by another worker, announced again), or answers its first control
request, and closed at a ``sweep`` once it serves none of them: its jobs no longer consumed
and none held (``keep``), and nothing published for ``IDLE`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from functools import partial

from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection

from queuegate.broker import Outgoing, connect, when_connected
from queuegate.errors import ServiceUnavailable
from queuegate.metrics import BROKER_RECONNECTS
from queuegate.single_flight import SingleFlight

IDLE = 60.0
"""Seconds a team's connection that consumes nothing stays open after its last publish."""


@dataclass
class _Line:
    connection: AbstractRobustConnection
    answers: AbstractRobustChannel
    jobs: AbstractRobustChannel | None
    """Opened when the worker first consumes the team's jobs."""
    replies: AbstractRobustChannel
    """Results and deltas, with publisher confirms and ``on_return_raises``."""
    used: float
    """When it was last asked to publish (``time.monotonic``)."""


class TeamConnections:
    """A worker's connection of each team::

    teams = TeamConnections(url, worker="host:123", within=30.0, on_reopen=consume_again)
    channel = await teams.jobs("search")              # declare and consume the team's queue
    replies = await teams.replies("search")           # publish its jobs' results there
    await teams.send("search", reply_to, message)     # a control answer
    await teams.sweep(keep={"search"})                # now and then: closes the idle ones
    await teams.close()

    ``on_reopen(team, channel)`` runs each time a team's jobs channel reopens (its connection
    came back, or the channel was closed to be renewed), its queues declared again: consume
    there again.
    """

    def __init__(
        self,
        url: str,
        *,
        worker: str,
        within: float,
        on_reopen: Callable[[str, AbstractRobustChannel], Awaitable[None]],
    ) -> None:
        self._url = url
        self._worker = worker
        self._within = within
        self._on_reopen = on_reopen
        self._lines: dict[str, _Line] = {}
        self._opening: SingleFlight[str, _Line] = SingleFlight()
        """One opening a team: the worker's and its answers' that come together share it."""
        self._dropping: set[asyncio.Task[None]] = set()
        """Closes of dropped jobs channels under way (``drop_jobs``): referenced so that none
        is collected before it is done."""
        self._closed = False

    async def jobs(self, team: str) -> AbstractRobustChannel:
        """The channel ``team``'s jobs are consumed and settled on, opened with its
        connection if need be."""
        line = await self._line(team)
        if line.jobs is None:
            jobs = line.jobs = await _channel(line.connection, team)

            async def reopened(channel: AbstractRobustChannel | None, /) -> None:
                # The sender, held weakly: ours holds it. Not one dropped since (drop_jobs).
                if channel is not None and line.jobs is jobs:
                    await self._on_reopen(team, channel)

            jobs.reopen_callbacks.add(reopened)
        return line.jobs

    def drop_jobs(self, team: str) -> None:
        """Give up ``team``'s jobs channel, on which the worker tracks no consumer, for the
        next ``jobs`` to open another: a step on it cut off by the worker's bound has aiormq
        close it, and its restore, itself waiting on a stalled connection, could leave it
        closed for good (the team was not served again); a consumer whose cancel was cut off
        so goes with it. Closed in the background: the broker may not answer for a while
        (``close`` ends it with the connection)."""
        line = self._lines.get(team)
        if line is None or line.jobs is None:
            return
        jobs, line.jobs = line.jobs, None

        async def close() -> None:
            with contextlib.suppress(Exception):
                await jobs.close()

        task = asyncio.create_task(close())
        self._dropping.add(task)
        task.add_done_callback(self._dropping.discard)

    async def replies(self, team: str) -> AbstractRobustChannel:
        """The channel results and deltas of ``team``'s jobs are published on (publisher
        confirms, ``on_return_raises``), opened with its connection if need be."""
        line = self._lines.get(team) or await self._line(team)
        line.used = time.monotonic()
        return line.replies

    async def send(self, team: str, reply_to: str, message: Outgoing) -> None:
        """Publish a control answer to ``reply_to`` (not mandatory: a client that gave up has
        no consumer there any more), waiting up to ``within`` for the team's connection to
        come back. Raises ServiceUnavailable when it does not, aiormq's AMQPError for a
        refusal."""
        line = await self._line(team)
        line.used = time.monotonic()

        async def publish() -> None:
            underlay = await line.answers.get_underlay_channel()
            await underlay.basic_publish(
                message.body, exchange="", routing_key=reply_to, properties=message.properties
            )

        await when_connected(
            line.answers,
            publish,
            within=self._within,
            what=f"answering a control request of team {team}",
        )

    async def _line(self, team: str) -> _Line:
        line = self._lines.get(team)
        if line is not None:
            return line
        return await self._opening(team, partial(self._open, team))

    async def _open(self, team: str) -> _Line:
        # Named for `rabbitmqctl list_connections client_properties`: whose, and which team.
        connection = await connect(self._url, name=f"worker:{self._worker} team:{team}")
        try:
            answers = await _channel(connection, team, publisher_confirms=False)
            replies = await _channel(
                connection, team, publisher_confirms=True, on_return_raises=True
            )
            if self._closed:
                # The worker stopped while this opened (a control request answered as it
                # stopped): nothing is to be left open after close().
                raise ServiceUnavailable(f"the worker stopped; team {team} is not served")
        except BaseException:
            await connection.close()
            raise
        reconnects = BROKER_RECONNECTS.labels(connection="team", team=team)
        connection.reconnect_callbacks.add(lambda *_: reconnects.inc())
        # Never used yet: idle from the start, until it publishes or serves jobs.
        line = self._lines[team] = _Line(
            connection, answers, None, replies, time.monotonic() - IDLE
        )
        return line

    async def sweep(self, *, keep: Collection[str]) -> None:
        """Close the connections of the teams not in ``keep`` (whose jobs this worker takes
        or holds) that published nothing for ``IDLE`` seconds."""
        now = time.monotonic()
        idle = [
            team
            for team, line in self._lines.items()
            if team not in keep and now - line.used >= IDLE
        ]
        # Together: a close waits for the broker's answer, which a stalled connection holds
        # (about 2 s), and the sweep runs in the loop that serves every team's changes.
        await asyncio.gather(*(self._lines.pop(team).connection.close() for team in idle))

    async def close(self) -> None:
        """Close every team's connection: whatever it holds unsettled returns to its queue.
        One still opening closes itself once open."""
        self._closed = True
        lines, self._lines = list(self._lines.values()), {}
        for task in list(self._dropping):
            task.cancel()
        await asyncio.gather(*(line.connection.close() for line in lines))


async def _channel(
    connection: AbstractRobustConnection, team: str, **options: bool
) -> AbstractRobustChannel:
    """A channel of ``team``'s connection; ServiceUnavailable when the broker closed the
    connection under the opening (the team's own doing, or a fault): it is coming back."""
    try:
        return await connection.channel(**options)
    except RuntimeError as exc:
        # aiormq's word for a connection closed while a channel opens on it.
        raise ServiceUnavailable(f"team {team}'s broker connection is down") from exc
