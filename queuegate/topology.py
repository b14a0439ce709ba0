"""Broker names and their idempotent declarations, all under one namespace.

| name                         | kind                       | purpose                           |
|------------------------------|----------------------------|-----------------------------------|
| ``<ns>.jobs``                | topic exchange             | producers publish, key = team     |
| ``<ns>.jobs.<team>``         | quorum queue               | one per team, dead-letters        |
| ``<ns>.results.<team>.<n>``  | quorum queue, expires      | a pipeline's named reply queue    |
| ``<ns>.replies.<team>.<id>`` | durable queue, expires     | one client's own reply queue      |
| ``<ns>.control``             | quorum queue               | control requests, key *.control   |
| ``<ns>.usage``               | fanout exchange            | one UsageEvent per finished job   |
| ``<ns>.accounting``          | quorum queue               | bound to usage; accounting reads  |
| ``<ns>.dead``                | fanout exchange + quorum q | poison and undeliverable jobs     |

Arguments of a queue cannot change once it exists (RabbitMQ refuses a redeclare that differs),
so per-team quotas are applied as policies, never as declare arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

MESSAGE_TYPE_JOB = "job"
MESSAGE_TYPE_RESULT = "result"
MESSAGE_TYPE_CHUNK = "chunk"
MESSAGE_TYPE_USAGE = "usage"

HEADER_DEAD_REASON = "x-queuegate-reason"
HEADER_DEAD_DETAIL = "x-queuegate-detail"
HEADER_DEAD_QUEUE = "x-queuegate-queue"
HEADER_SENT_MS = "x-queuegate-sent-ms"

CONTROL_MAX_LENGTH = 10_000
"""Control requests waiting at most; past it a request is refused at once. A constant, not
a setting: every declarer must give the queue the same arguments."""


@dataclass(frozen=True)
class Topology:
    """The names of one namespace's exchanges and queues, and how to declare them."""

    namespace: str
    delivery_limit: int = 5

    @property
    def jobs_exchange(self) -> str:
        return f"{self.namespace}.jobs"

    def team_queue(self, team: str) -> str:
        return f"{self.namespace}.jobs.{team}"

    def team_of_queue(self, queue: str) -> str:
        return queue.removeprefix(f"{self.namespace}.jobs.")

    def results_queue(self, team: str, name: str) -> str:
        return f"{self.namespace}.results.{team}.{name}"

    def replies_queue(self, team: str, client_id: str) -> str:
        # Client-named (not amq.gen-*) so a team's broker user can be allowed exactly its own.
        return f"{self.namespace}.replies.{team}.{client_id}"

    @property
    def control_queue(self) -> str:
        return f"{self.namespace}.control"

    @property
    def usage_exchange(self) -> str:
        return f"{self.namespace}.usage"

    @property
    def accounting_queue(self) -> str:
        return f"{self.namespace}.accounting"

    @property
    def dead_exchange(self) -> str:
        return f"{self.namespace}.dead"

    @property
    def dead_queue(self) -> str:
        return f"{self.namespace}.dead"

    def _quorum_args(self) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            "x-delivery-limit": self.delivery_limit,
            "x-dead-letter-exchange": self.dead_exchange,
            # At-least-once dead-lettering: a dead letter is never dropped on the way.
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }

    async def declare_jobs_exchange(self, channel: AbstractChannel) -> AbstractExchange:
        return await channel.declare_exchange(
            self.jobs_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )

    async def declare_dead(self, channel: AbstractChannel) -> AbstractExchange:
        exchange = await channel.declare_exchange(
            self.dead_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        queue = await channel.declare_queue(
            self.dead_queue, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await queue.bind(exchange)
        return exchange

    async def declare_team_queue(self, channel: AbstractChannel, team: str) -> AbstractQueue:
        """The team's job queue, bound to the jobs exchange under the team's routing key."""
        exchange = await self.declare_jobs_exchange(channel)
        await self.declare_dead(channel)
        await self.declare_control_queue(channel)
        queue = await channel.declare_queue(
            self.team_queue(team), durable=True, arguments=self._quorum_args()
        )
        await queue.bind(exchange, routing_key=team)
        return queue

    async def declare_control_queue(self, channel: AbstractChannel) -> AbstractQueue:
        """The control requests of every team (routing key ``<team>.control``; team names
        hold no dot, so ``*`` matches each one and a team's own binding ``<team>`` none).

        Declared with every team queue too, so that an app started before any worker waits
        for its answer rather than failing. Bounded: a team flooding it is refused at the
        broker, not queued without end. No dead-lettering: a request nobody could serve is
        of no use once its client gave up (it expires with its client's wait).
        """
        exchange = await self.declare_jobs_exchange(channel)
        queue = await channel.declare_queue(
            self.control_queue,
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-delivery-limit": self.delivery_limit,
                "x-max-length": CONTROL_MAX_LENGTH,
                "x-overflow": "reject-publish",
            },
        )
        await queue.bind(exchange, routing_key="*.control")
        return queue

    async def declare_results_queue(
        self, channel: AbstractChannel, team: str, name: str, *, expires_s: float
    ) -> AbstractQueue:
        """A durable reply queue that outlives its consumer, for pipelines that restart.

        It expires once unused (no consumer, no declare) for ``expires_s``, so a pipeline
        that never comes back does not leave it, and its results, forever.
        """
        return await channel.declare_queue(
            self.results_queue(team, name),
            durable=True,
            arguments={"x-queue-type": "quorum", "x-expires": int(expires_s * 1000)},
        )

    async def declare_replies_queue(
        self,
        channel: AbstractChannel,
        team: str,
        client_id: str,
        *,
        expires_s: float,
        max_length: int,
    ) -> AbstractQueue:
        """One client's reply queue, named by the client so it survives a dropped connection.

        An exclusive server-named queue dies with its connection, and a robust reconnect would
        declare a new name, so replies in flight would be returned as unroutable. This one
        keeps its name, and the broker deletes it once it has gone ``expires_s`` unused (the
        client is gone for good). Past ``max_length`` unread replies the oldest is dropped: a
        client that reads none cannot grow it without end.
        """
        return await channel.declare_queue(
            self.replies_queue(team, client_id),
            durable=True,
            arguments={
                "x-expires": int(expires_s * 1000),
                "x-max-length": max_length,
                "x-overflow": "drop-head",
            },
        )

    def collect_lock_queue(self, team: str, batch: str) -> str:
        # ":" is outside every name a client may ask for, so no reply queue can take it.
        return self.replies_queue(team, f"{batch}:collect")

    async def declare_collect_lock(
        self, channel: AbstractChannel, team: str, batch: str, *, expires_s: float
    ) -> AbstractQueue:
        """An empty queue a batch's collector consumes exclusively: a second one is refused,
        and the broker releases it with the collector's connection, even on SIGKILL."""
        return await channel.declare_queue(
            self.collect_lock_queue(team, batch),
            durable=False,
            arguments={"x-expires": int(expires_s * 1000), "x-max-length": 0},
        )

    async def declare_usage(self, channel: AbstractChannel) -> AbstractExchange:
        """The usage fanout exchange and the accounting queue bound to it."""
        exchange = await channel.declare_exchange(
            self.usage_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        await self.declare_dead(channel)
        queue = await channel.declare_queue(
            self.accounting_queue, durable=True, arguments=self._quorum_args()
        )
        await queue.bind(exchange)
        return exchange
