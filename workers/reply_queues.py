"""Whether a job's reply queue exists, asked of the broker before the job costs anything.

A result sent to a queue that does not exist is returned by the broker, after the provider
was paid for it. A passive declare answers first; a queue seen to exist is believed for
``REMEMBER`` seconds, so a client's stream of jobs costs one look, not one per job. Jobs that
ask about a queue while a look at it is under way share that look (5,000 jobs delivered at
once each opened a channel for the same queue, past the broker's 2,047 channels a connection,
and the broker closed the worker's connection).

A name no queue may have (a control character, past 255 bytes: what the client library
refuses to send) is answered as a queue that does not exist. A look that fails otherwise
(the worker's connection lost, the broker refusing the look, whatever is raised) answers
that it exists: the result's mandatory flag still tells, and the job is never returned to
its queue for it.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from functools import partial

import aiormq
from aio_pika.abc import AbstractConnection

from queuegate.single_flight import SingleFlight

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
"""RabbitMQ's direct reply-to pseudo-queues cannot be declared; the result's mandatory flag
still tells when their consumer is gone."""
REMEMBER = 10.0
"""Seconds a queue seen to exist is believed: one deleted meanwhile returns the result, which
the usage row records as ``reply_delivered = false``."""
SIZE = 10_000

log = logging.getLogger(__name__)


class ReplyQueues:
    def __init__(self, connection: AbstractConnection) -> None:
        self._connection = connection
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._looking: SingleFlight[str, bool] = SingleFlight()

    async def exists(self, queue: str) -> bool:
        if queue.startswith(DIRECT_REPLY_TO):
            return True
        seen = self._seen.get(queue)
        if seen is not None and time.monotonic() - seen < REMEMBER:
            return True
        return await self._looking(queue, partial(self._look, queue))

    async def _look(self, queue: str) -> bool:
        now = time.monotonic()
        transport = self._connection.transport
        if transport is None:
            return True  # no broker to ask; the result's mandatory flag still tells
        try:
            if not await _declared(transport.connection, queue):
                self._seen.pop(queue, None)
                return False
        except Exception as exc:  # whatever it is, the job is not failed for a look
            log.warning(
                "could not look whether reply queue %r exists (%s: %s); the result's return "
                "will tell",
                queue,
                type(exc).__name__,
                exc,
            )
            return True
        self._seen[queue] = now
        self._seen.move_to_end(queue)
        if len(self._seen) > SIZE:
            self._seen.popitem(last=False)
        return True


async def _declared(connection: aiormq.abc.AbstractConnection, queue: str) -> bool:
    """Whether the broker has ``queue``, by a passive declare."""
    # A plain channel of its own: the broker closes the channel of a passive declare that
    # fails, and a robust one would open again only to be closed.
    channel = await connection.channel()
    try:
        await channel.queue_declare(queue, passive=True)
    # ValueError: pamqp's, for a name outside AMQP's queue-name domain, never sent.
    except (aiormq.exceptions.ChannelNotFoundEntity, ValueError):
        return False
    except aiormq.exceptions.ChannelLockedResource:
        return True  # exclusive to its app's connection, as AMQP's RPC pattern has it
    finally:
        if not channel.is_closed:
            await channel.close()
    return True
