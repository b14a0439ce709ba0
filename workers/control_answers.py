"""The answers to a team's control requests, on a broker connection of that team's alone.

A control request names where its answer goes: a direct reply-to name, which the team sets.
RabbitMQ 3.10 crashes the channel that publishes to a name it cannot decode (its
``pid_recomposition:from_binary`` fails on a crafted one) and closes that channel's whole
connection (541 INTERNAL_ERROR). Answered on the worker's own connection, one request from a
team's own credentials dropped it about six times (the request delivered again after each, up
to its queue's delivery limit): every team's jobs were redelivered and waited about 30 s.
Here each team's answers go on a connection of its own, opened at its first answer and closed
once idle for ``IDLE`` seconds: such a request closes only the connection of its own team's
answers, and it is acknowledged on the worker's, so it is not delivered again.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection

from queuegate.broker import Outgoing, connect, when_connected
from queuegate.metrics import BROKER_RECONNECTS

IDLE = 60.0
"""Seconds a team's answer connection stays open after its last answer."""


@dataclass
class _Line:
    connection: AbstractRobustConnection
    channel: AbstractRobustChannel
    used: float


class ControlAnswers:
    """Publishes control answers, each team's on its own connection::

    answers = ControlAnswers(settings.amqp_url, within=settings.reconnect_wait)
    await answers.send("search", reply_to, message)
    await answers.sweep()   # now and then: closes the connections idle for IDLE seconds
    await answers.close()
    """

    def __init__(self, url: str, *, within: float) -> None:
        self._url = url
        self._within = within
        self._lines: dict[str, _Line] = {}
        self._opening: dict[str, asyncio.Future[_Line]] = {}

    async def send(self, team: str, reply_to: str, message: Outgoing) -> None:
        """Publish ``message`` to ``reply_to`` (not mandatory: a client that gave up has no
        consumer there any more), waiting up to ``within`` for the team's connection to come
        back. Raises ServiceUnavailable when it does not, aiormq's AMQPError for a refusal."""
        line = await self._line(team)
        line.used = time.monotonic()

        async def publish() -> None:
            underlay = await line.channel.get_underlay_channel()
            await underlay.basic_publish(
                message.body, exchange="", routing_key=reply_to, properties=message.properties
            )

        await when_connected(
            line.channel,
            publish,
            within=self._within,
            what=f"answering a control request of team {team}",
        )

    async def _line(self, team: str) -> _Line:
        line = self._lines.get(team)
        if line is not None:
            return line
        # One opening a team: requests that come together share it.
        opening = self._opening.get(team)
        if opening is None:
            opening = self._opening[team] = asyncio.ensure_future(self._open(team))
            opening.add_done_callback(lambda _: self._opening.pop(team, None))
        return await asyncio.shield(opening)

    async def _open(self, team: str) -> _Line:
        connection = await connect(self._url, name=f"control:{team}")
        try:
            channel = await connection.channel(publisher_confirms=False)
        except BaseException:
            await connection.close()
            raise
        connection.reconnect_callbacks.add(
            lambda *_: BROKER_RECONNECTS.labels(connection="control").inc()
        )
        line = self._lines[team] = _Line(connection, channel, time.monotonic())
        return line

    async def sweep(self) -> None:
        """Close the connections of the teams that had no answer for ``IDLE`` seconds."""
        now = time.monotonic()
        for team, line in list(self._lines.items()):
            if now - line.used >= IDLE:
                del self._lines[team]
                await line.connection.close()

    async def close(self) -> None:
        lines, self._lines = list(self._lines.values()), {}
        for line in lines:
            await line.connection.close()
