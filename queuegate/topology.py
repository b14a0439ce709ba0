"""Broker names and their idempotent declarations, all under one namespace.

| name                                | kind                   | purpose                           |
|-------------------------------------|------------------------|-----------------------------------|
| ``<ns>.in.<team>``                  | topic exchange         | the team's apps publish, its keys |
| ``<ns>.jobs``                       | topic exchange         | the gateway publishes, key = team |
| ``<ns>.jobs.<team>``                | quorum queue           | one per team, dead-letters        |
| ``<ns>.results.<team>.<n>``         | quorum queue, expires  | a pipeline's named reply queue    |
| ``<ns>.results.<team>.<b>:results`` | quorum queue, expires  | a batch's results                 |
| ``<ns>.replies.<team>.<id>``        | durable queue, expires | one client's own reply queue      |
| ``<ns>.control.<team>``             | quorum queue           | the team's control requests       |
| ``<ns>.frontdoor.<id>``             | queue, expires         | one HTTP front-door process's     |
| ``<ns>.usage``                      | fanout exchange        | UsageEvents, a batch per message  |
| ``<ns>.accounting``                 | quorum queue           | bound to usage; accounting reads  |
| ``<ns>.dead``                       | fanout exchange        | each queue's dead-letter exchange |
| ``<ns>.dead``                       | quorum queue           | accounting's dead letters         |
| ``<ns>.dead.teams``                 | direct exchange        | bound to ``<ns>.dead``, by team   |
| ``<ns>.dead.<team>``                | quorum queue           | one team's poison, expired jobs   |

Each team publishes to an exchange of its own, ``<ns>.in.<team>``, bound to its job and control
queues alone, and its broker user may write to no other: RabbitMQ before 4.0.3 does not check a
message's ``CC`` and ``BCC`` header keys against a user's topic permissions, so on the shared
``<ns>.jobs`` a team could copy its jobs into any other team's queue; on its own exchange those
keys find no queue but its own. The gateway's own publishers (the front door's jobs,
dead-letter replay) keep ``<ns>.jobs``, to which every team's queues stay bound.

Arguments of a queue cannot change once it exists (RabbitMQ refuses a redeclare that differs),
so per-team quotas are applied as policies, never as declare arguments. A team's reply and
results queues carry their bound (``Bound``) both ways: as arguments, and as the policy
``teams add`` puts, which bounds those an earlier version declared (kept as they were).
The dead-letter queues' bounds are arguments: a ``<ns>.dead`` declared by a version without
them must be emptied and deleted once (``queuegate dlq purge``, then delete the queue)
before the upgrade.

Dead letters are kept per team, so that one team's flood of expiring jobs drops only its own
oldest letters. Every queue's ``x-dead-letter-exchange`` stays the ``<ns>.dead`` fanout (an
argument, and an exchange's type cannot change either); it forwards everything to the direct
``<ns>.dead.teams``, which routes by key: the broker dead-letters a job under the key it was
published with (``<team>``, or only that when the team's quota policy sets
``dead-letter-routing-key``), and a worker publishes its own dead letters under the job
queue's name. Accounting's dead letters keep the usage exchange's empty key, into the
``<ns>.dead`` queue, which earlier versions bound to the fanout (that binding is removed).

The job and accounting queues' ``x-delivery-limit`` is a far safety net, not the poison limit
(workers count a job's failures themselves, ``workers/claims.py``): a quorum queue counts
every return, and a worker that dies returns every job waiting in its prefetch. A queue
declared by an earlier version with the poison limit as its argument (a policy cannot raise
it: the broker takes the lower of the two) is declared with its own limit, with a warning,
until it is moved over (see README, "Poison jobs and dead letters").

On a cluster (several nodes in ``QUEUEGATE_AMQP_URL``) the clients' and front doors' reply
queues are quorum queues too, so a reply in flight survives the loss of the node that held
it; on one node they stay classic, which costs the broker less per result. A batch
collector's lock queue stays a transient classic queue (a quorum queue is always durable):
it dies with its node, as its collector's connection does, which is what it is for.

Every quorum queue gets ``QUEUEGATE_QUORUM_REPLICAS`` members when it is set
(``x-quorum-initial-group-size``), or the broker's default, every node, when not.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, get_args

import aio_pika
import aiormq.abc
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue
from aiormq.exceptions import ChannelPreconditionFailed

from queuegate.broker import node_urls
from queuegate.control import BATCH_RESULTS_SUFFIX, CONTROL_KEY_SUFFIX, BatchLockRole, BatchMeta
from queuegate.errors import BAD_INPUT, ConfigError
from queuegate.settings import Settings

log = logging.getLogger(__name__)

MESSAGE_TYPE_JOB = "job"
MESSAGE_TYPE_RESULT = "result"
MESSAGE_TYPE_CHUNK = "chunk"
MESSAGE_TYPE_USAGE = "usage"
"""One UsageEvent (what workers sent before batches; still accepted)."""
MESSAGE_TYPE_USAGE_BATCH = "usage-batch"
"""A UsageBatch: the events of several jobs."""

DELIVERY_LIMIT_REASON = "delivery_limit"
"""Why a worker dead-letters a job past ``QUEUEGATE_DELIVERY_LIMIT`` failures; also the
broker's reason for one past its queue's own ``x-delivery-limit``."""
WORKER_DEAD_REASONS = BAD_INPUT | {DELIVERY_LIMIT_REASON}
"""Why a worker dead-letters a job itself (``HEADER_DEAD_REASON``): bad input, refused under
its error's code, or too many failures."""
BROKER_DEAD_REASONS = frozenset({DELIVERY_LIMIT_REASON, "expired", "maxlen", "rejected"})
"""Why RabbitMQ dead-letters a message from a queue declared here with a dead-letter
exchange, as its ``x-death`` header records it."""

# Headers a worker sets on the letters it dead-letters itself. The dead-letter tools trust them
# only on a letter whose broker-validated user_id is an operator's (the worker's own user):
# a team's message dead-lettered by the broker keeps whatever headers the team set.
HEADER_DEAD_REASON = "x-queuegate-reason"
HEADER_DEAD_DETAIL = "x-queuegate-detail"
HEADER_DEAD_QUEUE = "x-queuegate-queue"
HEADER_DEAD_USER = "x-queuegate-user"
"""The user_id the refused job was published under (empty: none)."""
HEADER_DEAD_TRUNCATED = "x-queuegate-truncated"
"""Bytes of the original body, on a letter whose body was cut to ``DEAD_BODY_LIMIT``."""
HEADER_DEAD_UNANSWERED = "x-queuegate-unanswered"
"""Set on a letter refused as bad input whose refusal reached no reply queue (none named, or
gone or full): no caller has that answer, so the letter is not called answered."""
# Set by ``dlq replay`` on what it re-publishes (under an operator's user_id, so trusted).
HEADER_REPLAY_OF = "x-queuegate-replay-of"
"""The user_id the replayed job was first published under (empty: none)."""
HEADER_FIRST_REASON = "x-queuegate-first-reason"
HEADER_FIRST_DETAIL = "x-queuegate-first-detail"
"""Why the replayed job was first dead-lettered: a second refusal never hides it."""
HEADER_SENT_MS = "x-queuegate-sent-ms"

CONTROL_DELIVERY_LIMIT = 5
"""Deliveries of a control request before the broker drops it (it has no dead-letter queue);
what earlier versions declared with the default ``QUEUEGATE_DELIVERY_LIMIT``."""
CONTROL_MAX_LENGTH = 1_000
"""Control requests of one team waiting at most; past it the broker refuses the team's next
one at once. A constant, not a setting: every declarer must give the queue the same
arguments."""
CONTROL_MAX_BYTES = 64 * 1024 * 1024
"""Bytes of one team's control requests waiting at most (a policy that ``teams add`` puts):
without it, CONTROL_MAX_LENGTH requests of the broker's largest message size (16 MiB in
deploy/, 128 MiB by default) would fill its memory. Some 800 of a batch's largest steps
(1,000 custom ids of at most 64 characters) could still wait at once."""


def batch_lock_of(name: str) -> tuple[str, BatchLockRole] | None:
    """The batch and role of a batch's lock, ``<ns>.replies.<team>.<batch>:<role>`` or its
    last part: an empty queue whose exclusive consumer is the batch's collector (or
    submitter), removed by the broker once unused (no reply queue, no slot of the team's)."""
    batch, colon, role = name.rpartition(".")[2].rpartition(":")
    for known in get_args(BatchLockRole):
        if colon and role == known:
            return batch, known
    return None


def batch_of_results_queue(name: str) -> str | None:
    """The batch whose results queue ``name`` (its full name, or its last part) is, when it
    is one of its own: not one of the team's reply queues."""
    batch, suffix, rest = name.rpartition(".")[2].partition(BATCH_RESULTS_SUFFIX)
    return batch if suffix and not rest else None


def header_text(value: object) -> str | None:
    """A header's string value (the broker may hand one back as bytes); None if not a string."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value if isinstance(value, str) else None


_REPLY_NAME = re.compile(r"[^.\s]{1,200}")
"""The last part of a durable reply queue's name, matched whole (what workers accept)."""

DEAD_BODY_LIMIT = 64 * 1024
"""Bytes of a job's body kept when a worker dead-letters it: enough to see what was wrong."""
DEAD_DELIVERY_LIMIT = 1_000_000_000
"""Out of reach: every listing returns the letters it read, and each return counts as a
delivery (RabbitMQ 4 gives quorum queues a default limit of 20, and a dead letter at its
limit would be dropped)."""
JOBS_DELIVERY_LIMIT = 100
"""The team queues' own limit, a safety net: workers dead-letter a job past
``QUEUEGATE_DELIVERY_LIMIT`` failures; the broker's count, which also has every return of a job
held by a worker that died, only ends a job when workers cannot count (Redis unreachable)."""
ACCOUNTING_DELIVERY_LIMIT = 10_000
"""The accounting queue's: a usage batch cannot poison accounting (a malformed event is
rejected on its own), so only a bug in accounting itself ever reaches it."""
DEAD_MAX_LENGTH = 100_000
DEAD_MAX_BYTES = 512 * 1024 * 1024
"""Bounds of the ``<ns>.dead`` queue (accounting's letters, and every team's before dead letters
were kept per team): beyond them the oldest letters are dropped (see declare_dead)."""
TEAM_DEAD_MAX_LENGTH = 10_000
TEAM_DEAD_MAX_BYTES = 64 * 1024 * 1024
"""Bounds of one team's ``<ns>.dead.<team>``: beyond them its own oldest letters are dropped."""


@dataclass(frozen=True)
class Bound:
    """What each of a team's reply and results queues holds unread at most: past either
    bound the broker refuses the next result (the worker records it undelivered), so a team
    that reads none parks at most ``max_bytes`` of bodies in each. The same bounds are the
    queues' arguments and the policy ``teams add`` puts (for queues of earlier versions)."""

    max_length: int
    max_bytes: int

    @classmethod
    def of(cls, settings: Settings) -> Bound:
        return cls(settings.reply_queue_max_length, settings.reply_queue_max_bytes)

    def policy(self) -> dict[str, Any]:
        """The bounds as a policy's definition."""
        return {
            "max-length": self.max_length,
            "max-length-bytes": self.max_bytes,
            "overflow": "reject-publish",
        }

    def arguments(self) -> dict[str, Any]:
        """The bounds as a queue's arguments."""
        return {f"x-{key}": value for key, value in self.policy().items()}


DeadLetterStrategy = Literal["at-least-once", "at-most-once"]
TEAM_DEAD_LETTERING: DeadLetterStrategy = "at-most-once"
"""How a team's job queue dead-letters. At-least-once hands each letter to a dead-letter worker
of the broker's, which RabbitMQ 3.10 crashes on a malformed ``x-death`` header, a header any
team may set on its own jobs: it crashes again at each restart until the supervisor of every
queue's workers gives up, and no queue of the node dead-letters from then on, nor starts
(attacks of 2026-12-06, twice, on the shared broker). At-most-once drops that job's letter
alone and nothing else breaks (measured on a private node); it may drop a letter in a broker
fault too, where the dead-letter queue has no leader: a job that was never served, whose
caller has its own deadline, never a bill."""

_EARLIER_LIMIT = re.compile(r"inequivalent arg 'x-delivery-limit'.* current is '(\d+)'")
"""The broker's refusal of a declare that differs in the delivery limit."""
_EARLIER_STRATEGY = re.compile(
    r"inequivalent arg 'x-dead-letter-strategy'.* current is '([a-z-]+)'"
)
"""The broker's refusal of a declare that differs in the dead-letter strategy."""


async def _probe(
    underlay: aiormq.abc.AbstractChannel, name: str, arguments: dict[str, Any]
) -> None:
    """Declare ``name`` on a channel of its own, closed after (the broker closes it first when
    the queue exists with other arguments)."""
    probe = await underlay.connection.channel()
    try:
        await probe.queue_declare(name, durable=True, arguments=arguments)
    finally:
        if not probe.is_closed:
            await probe.close()


class _Kept(NamedTuple):
    """The arguments an earlier version declared a queue with, and what to log of them."""

    arguments: dict[str, Any]
    level: int
    why: str


@dataclass(frozen=True)
class Topology:
    """The names of one namespace's exchanges and queues, and how to declare them."""

    namespace: str
    replicas: int | None = None
    """Members of each quorum queue declared; None, the broker's default (every node)."""
    cluster: bool = False
    """Whether the broker is a cluster: reply queues are then quorum queues too."""

    @classmethod
    def of(cls, settings: Settings) -> Topology:
        """The topology of ``settings``' namespace, broker and replica count."""
        return cls(
            settings.namespace,
            replicas=settings.quorum_replicas,
            cluster=len(node_urls(settings.amqp_url)) > 1,
        )

    def _quorum(self) -> dict[str, Any]:
        """What makes a queue a quorum queue of this topology's size."""
        if self.replicas is None:
            return {"x-queue-type": "quorum"}
        return {"x-queue-type": "quorum", "x-quorum-initial-group-size": self.replicas}

    def _reply_queue_type(self) -> dict[str, Any]:
        return self._quorum() if self.cluster else {}

    @property
    def jobs_exchange(self) -> str:
        return f"{self.namespace}.jobs"

    def entry_exchange(self, team: str) -> str:
        """Where the team's apps publish its jobs and control requests: no other team's queue
        is bound to it, whatever keys a message names."""
        return f"{self.namespace}.in.{team}"

    def team_queue(self, team: str) -> str:
        return f"{self.namespace}.jobs.{team}"

    def team_of_queue(self, queue: str) -> str:
        return queue.removeprefix(f"{self.namespace}.jobs.")

    def results_queue(self, team: str, name: str) -> str:
        if not _REPLY_NAME.fullmatch(name):
            raise ConfigError(f"reply queue name {name!r} is invalid: no dots, spaces or newlines")
        return f"{self.namespace}.results.{team}.{name}"

    def batch_results_queue(self, meta: BatchMeta) -> str:
        """Where a batch's results wait: ``<ns>.results.<team>.<batch>:results``, a name no
        pipeline's named reply queue can take (``:`` is outside them), so neither reads nor
        deletes the other's results; the named reply queue ``<batch>`` for a batch recorded
        before (``BatchMeta.own_queue``), whose jobs went out with that ``reply_to``."""
        return self.results_queue(meta.team, meta.reply_name)

    def is_results_queue(self, queue: str) -> bool:
        """Whether ``queue`` is a named results queue (a pipeline's, a batch's): one that keeps
        results while nobody reads them, so they are sent persistent."""
        return queue.startswith(f"{self.namespace}.results.")

    def team_reply_queues_pattern(self) -> str:
        """Every team's reply and results queues, as a regex (the policy bounding them);
        never a front door's, whose results are the gateway's own."""
        return rf"^{re.escape(self.namespace)}\.(replies|results)\."

    def is_team_reply_queue(self, queue: str) -> bool:
        """Whether ``queue`` is one of a team's reply or results queues, which the gateway
        bounds (``Bound``): one that refuses a result is full of unread ones."""
        return re.match(self.team_reply_queues_pattern(), queue) is not None

    def replies_queue(self, team: str, client_id: str) -> str:
        # Client-named (not amq.gen-*) so a team's broker user can be allowed exactly its own.
        return f"{self.namespace}.replies.{team}.{client_id}"

    def frontdoor_queue(self, process_id: str) -> str:
        return f"{self.namespace}.frontdoor.{process_id}"

    def control_queue(self, team: str) -> str:
        return f"{self.namespace}.control.{team}"

    @property
    def shared_control_queue(self) -> str:
        """The one control queue of every team in earlier versions, bound under
        ``*.control``: workers delete it (and so its binding) when they start."""
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
        """Accounting's dead letters (and every team's, from versions before per-team ones)."""
        return f"{self.namespace}.dead"

    @property
    def dead_teams_exchange(self) -> str:
        return f"{self.namespace}.dead.teams"

    def team_dead_queue(self, team: str) -> str:
        return f"{self.namespace}.dead.{team}"

    @property
    def dlq_lock_queue(self) -> str:
        """The dead-letter commands' (``queuegate.dlq``) lock of ``<ns>.dead``, which earlier
        versions' commands took for every dead-letter queue: an exclusive queue, whose name
        no team can have declared (teams configure nothing, and the queues declared for
        them are ``<ns>.replies.*``/``<ns>.results.*``)."""
        return f"{self.namespace}.dlq.lock"

    def dead_lock_queue(self, dead_queue: str) -> str:
        """The dead-letter commands' lock of one dead-letter queue: ``dlq_lock_queue`` for
        ``<ns>.dead``, ``<ns>.dlq.lock.<team>`` for ``<ns>.dead.<team>``."""
        if dead_queue == self.dead_queue:
            return self.dlq_lock_queue
        return f"{self.dlq_lock_queue}.{dead_queue.removeprefix(f'{self.dead_queue}.')}"

    def _quorum_args(self, delivery_limit: int, *, strategy: DeadLetterStrategy) -> dict[str, Any]:
        return {
            **self._quorum(),
            "x-delivery-limit": delivery_limit,
            "x-dead-letter-exchange": self.dead_exchange,
            "x-dead-letter-strategy": strategy,
            "x-overflow": "reject-publish",
        }

    async def declare_jobs_exchange(self, channel: AbstractChannel) -> AbstractExchange:
        return await channel.declare_exchange(
            self.jobs_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )

    async def declare_entry_exchange(self, channel: AbstractChannel, team: str) -> AbstractExchange:
        # Topic, bound under the team's two keys exactly (no wildcard): the broker checks the
        # routing key a team publishes under against its topic permissions on topic
        # exchanges alone, and so a delivery's key stays the team's own.
        return await channel.declare_exchange(
            self.entry_exchange(team), aio_pika.ExchangeType.TOPIC, durable=True
        )

    def _dead_args(self, max_length: int, max_bytes: int) -> dict[str, Any]:
        # Bounded, as no team's quota covers them: a team whose jobs expire by the million would
        # otherwise fill the broker's memory and disk. drop-head, not reject-publish: a full
        # dead-letter queue must never refuse a worker's dead letter (the job would loop to
        # its delivery limit) nor hold dead letters back in the team queues; the oldest
        # letters are the ones an operator has had the longest to see.
        return {
            **self._quorum(),
            "x-delivery-limit": DEAD_DELIVERY_LIMIT,
            "x-max-length": max_length,
            "x-max-length-bytes": max_bytes,
            "x-overflow": "drop-head",
        }

    async def _declare_dead_teams_exchange(self, channel: AbstractChannel) -> AbstractExchange:
        return await channel.declare_exchange(
            self.dead_teams_exchange, aio_pika.ExchangeType.DIRECT, durable=True
        )

    async def _declare_dead_exchanges(
        self, channel: AbstractChannel
    ) -> tuple[AbstractExchange, AbstractExchange]:
        """The dead-letter exchange every queue names, and the one by team it feeds."""
        exchange = await channel.declare_exchange(
            self.dead_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        by_team = await self._declare_dead_teams_exchange(channel)
        await by_team.bind(exchange)
        return exchange, by_team

    async def declare_dead(self, channel: AbstractChannel) -> AbstractExchange:
        """The dead-letter exchanges, and the ``<ns>.dead`` queue for accounting's letters.

        Moves the queue off its earlier versions' binding too: run as a process starts
        (workers, accounting) and at ``teams add``, not per team; the dead-letter commands
        declare nothing."""
        exchange, by_team = await self._declare_dead_exchanges(channel)
        queue = await channel.declare_queue(
            self.dead_queue,
            durable=True,
            arguments=self._dead_args(DEAD_MAX_LENGTH, DEAD_MAX_BYTES),
        )
        # Bound before its fanout binding of earlier versions goes, so no letter of accounting's
        # falls between: through it, every team's letters would still drop accounting's.
        await queue.bind(by_team, routing_key="")
        await queue.unbind(exchange)
        return exchange

    async def declare_team_dead(self, channel: AbstractChannel, team: str) -> AbstractQueue:
        """The team's dead-letter queue, bounded on its own: a team that floods it drops only
        its own oldest letters."""
        by_team = await self._declare_dead_teams_exchange(channel)
        return await self._declare_team_dead(channel, team, by_team)

    async def _declare_team_dead(
        self, channel: AbstractChannel, team: str, by_team: AbstractExchange
    ) -> AbstractQueue:
        queue = await channel.declare_queue(
            self.team_dead_queue(team),
            durable=True,
            arguments=self._dead_args(TEAM_DEAD_MAX_LENGTH, TEAM_DEAD_MAX_BYTES),
        )
        # The broker dead-letters under the key the job was published with; a worker publishes
        # its dead letters under the job queue's name (as earlier versions did too).
        await queue.bind(by_team, routing_key=team)
        await queue.bind(by_team, routing_key=self.team_queue(team))
        return queue

    async def declare_team_queue(self, channel: AbstractChannel, team: str) -> AbstractQueue:
        """The team's job queue, bound under the team's routing key to the jobs exchange and
        to the team's entry exchange (with its control queue)."""
        exchange = await self.declare_jobs_exchange(channel)
        entry = await self.declare_entry_exchange(channel, team)
        # Before the job queue: a job that expires in it at once finds where to go.
        _, by_team = await self._declare_dead_exchanges(channel)
        await self._declare_team_dead(channel, team, by_team)
        await self._declare_control_queue(channel, team, exchange, entry)
        queue = await self._declare_served(
            channel,
            self.team_queue(team),
            self._quorum_args(JOBS_DELIVERY_LIMIT, strategy=TEAM_DEAD_LETTERING),
        )
        await queue.bind(exchange, routing_key=team)
        await queue.bind(entry, routing_key=team)
        return queue

    async def _declare_served(
        self, channel: AbstractChannel, name: str, arguments: dict[str, Any]
    ) -> AbstractQueue:
        """A durable queue the gateway consumes, with this version's arguments or an earlier
        version's delivery limit; declared on ``channel`` too once the arguments are known,
        for a robust channel to declare it again when it reconnects."""

        def earlier(refused: str, arguments: dict[str, Any]) -> _Kept | None:
            limit = _EARLIER_LIMIT.search(refused)
            if limit is not None:
                return _Kept(
                    arguments | {"x-delivery-limit": int(limit[1])},
                    logging.WARNING,
                    f"delivery limit ({limit[1]}): what merely waits in a worker that dies "
                    "counts toward it; move it over as the README says (Poison jobs and dead "
                    "letters)",
                )
            strategy = _EARLIER_STRATEGY.search(refused)
            if strategy is not None:
                return _Kept(
                    arguments | {"x-dead-letter-strategy": strategy[1]},
                    logging.WARNING,
                    f"dead-letter strategy ({strategy[1]}): on RabbitMQ 3.10 a job of the "
                    "team's with a malformed x-death header stops the dead-lettering of every "
                    "queue; move it over as the README says (A broker fault a team can reach)",
                )
            return None

        arguments = await self._declare(channel, name, arguments, earlier)
        return await channel.declare_queue(name, durable=True, arguments=arguments)

    async def _declare(
        self,
        channel: AbstractChannel,
        name: str,
        arguments: dict[str, Any],
        earlier: Callable[[str, dict[str, Any]], _Kept | None],
    ) -> dict[str, Any]:
        """Declare the durable queue ``name`` with ``arguments``, or, where the broker refuses
        them, with what ``earlier`` finds an earlier version declared it with in each refusal
        (the broker names one difference at a time; None, or nothing new: any other
        difference, refused as before with ChannelPreconditionFailed); the arguments it has.

        On channels of their own: the broker closes the channel of a declare whose arguments
        differ, and ``channel`` may carry consumers or answer control requests."""
        underlay = await channel.get_underlay_channel()
        kept: list[_Kept] = []
        while True:
            try:
                await _probe(underlay, name, arguments)
                break
            except ChannelPreconditionFailed as exc:
                found = earlier(str(exc), arguments)
                if found is None or found.arguments == arguments:
                    raise
                kept.append(found)
                arguments = found.arguments
        for each in kept:
            log.log(each.level, "queue %s keeps an earlier version's %s", name, each.why)
        return arguments

    async def declare_control_queue(self, channel: AbstractChannel, team: str) -> AbstractQueue:
        """The team's control requests (routing key ``<team>.control``), a queue per team as
        jobs have: workers take a few at a time from each, so a team's flood delays its own
        requests, never another team's.

        Declared with the team's job queue, so that an app started before any worker waits
        for its answer rather than failing. Bounded: a team flooding it is refused at the
        broker, not queued without end. No dead-lettering: a request nobody could serve is
        of no use once its client gave up (it expires with its client's wait).
        """
        exchange = await self.declare_jobs_exchange(channel)
        entry = await self.declare_entry_exchange(channel, team)
        return await self._declare_control_queue(channel, team, exchange, entry)

    async def _declare_control_queue(
        self,
        channel: AbstractChannel,
        team: str,
        exchange: AbstractExchange,
        entry: AbstractExchange,
    ) -> AbstractQueue:
        queue = await self._declare_served(
            channel,
            self.control_queue(team),
            {
                **self._quorum(),
                "x-delivery-limit": CONTROL_DELIVERY_LIMIT,
                "x-max-length": CONTROL_MAX_LENGTH,
                "x-overflow": "reject-publish",
            },
        )
        await queue.bind(exchange, routing_key=team + CONTROL_KEY_SUFFIX)
        await queue.bind(entry, routing_key=team + CONTROL_KEY_SUFFIX)
        return queue

    async def declare_results_queue(
        self, channel: AbstractChannel, team: str, name: str, *, expires_s: float, bound: Bound
    ) -> AbstractQueue:
        """A durable reply queue that outlives its consumer, for pipelines that restart.

        It expires once unused (no consumer, no declare) for ``expires_s``, so a pipeline
        that never comes back does not leave it, and its results, forever; past ``bound``
        the broker refuses the next result. One an earlier version declared (an expiry only)
        is kept as it was; the policy ``teams add`` puts bounds it.
        """
        base = {**self._quorum(), "x-expires": int(expires_s * 1000)}
        return await self._declare_reply(
            channel, self.results_queue(team, name), base | bound.arguments(), earlier=base
        )

    async def declare_replies_queue(
        self,
        channel: AbstractChannel,
        team: str,
        client_id: str,
        *,
        expires_s: float,
        bound: Bound,
    ) -> AbstractQueue:
        """One client's reply queue, named by the client so it survives a dropped connection.

        An exclusive server-named queue dies with its connection, and a robust reconnect would
        declare a new name, so replies in flight would be returned as unroutable. This one
        keeps its name, and the broker deletes it once it has gone ``expires_s`` unused (the
        client is gone for good). Past ``bound`` the broker refuses the next result: a client
        that reads none cannot grow it without end. One an earlier version declared (the
        oldest dropped past a count) is kept as it was; the policy ``teams add`` puts bounds
        its bytes.
        """
        base = {**self._reply_queue_type(), "x-expires": int(expires_s * 1000)}
        earlier = base | {"x-max-length": bound.max_length, "x-overflow": "drop-head"}
        return await self._declare_reply(
            channel, self.replies_queue(team, client_id), base | bound.arguments(), earlier=earlier
        )

    async def _declare_reply(
        self,
        channel: AbstractChannel,
        name: str,
        arguments: dict[str, Any],
        *,
        earlier: dict[str, Any],
    ) -> AbstractQueue:
        """A team's reply or results queue with this version's arguments, or, when an
        earlier version declared it (the broker refuses a redeclare that differs), with that
        version's: a client's queue must keep working across the upgrade until it expires.

        Declared once, on a channel of its own and not on ``channel`` as well: a robust
        channel keeps every queue declared on it, to declare them all again when it
        reconnects, and the control plane's would grow by one each open and bring back the
        queues that expired meanwhile."""
        kept = _Kept(earlier, logging.INFO, "arguments until it expires")
        arguments = await self._declare(channel, name, arguments, lambda _, __: kept)
        return aio_pika.Queue(
            channel, name, durable=True, exclusive=False, auto_delete=False, arguments=arguments
        )

    async def declare_frontdoor_queue(
        self, channel: AbstractChannel, process_id: str, *, expires_s: float, max_length: int
    ) -> AbstractQueue:
        """The reply queue of one front-door process, for the jobs of every team it serves.

        Declared by the front door (whose user is the gateway's, with configure rights); it
        survives a dropped connection like a client's, and the broker deletes it once unused
        for ``expires_s`` (the process is gone). Past ``max_length`` unread replies the oldest
        is dropped: its caller has long given up, and can read the outcome by job id.
        """
        return await channel.declare_queue(
            self.frontdoor_queue(process_id),
            durable=True,
            arguments={
                **self._reply_queue_type(),
                "x-expires": int(expires_s * 1000),
                "x-max-length": max_length,
                "x-overflow": "drop-head",
            },
        )

    def batch_lock_queue(self, team: str, batch: str, role: BatchLockRole) -> str:
        # ":" is outside every name a client may ask for, so no reply queue can take it.
        return self.replies_queue(team, f"{batch}:{role}")

    async def declare_batch_lock(
        self,
        channel: AbstractChannel,
        team: str,
        batch: str,
        role: BatchLockRole,
        *,
        expires_s: float,
    ) -> AbstractQueue:
        """An empty queue a batch's collector (or submitter) consumes exclusively: a second
        one is refused, and the broker releases it with the holder's connection, even on
        SIGKILL."""
        return await channel.declare_queue(
            self.batch_lock_queue(team, batch, role),
            durable=False,
            arguments={"x-expires": int(expires_s * 1000), "x-max-length": 0},
        )

    async def declare_usage(self, channel: AbstractChannel) -> AbstractExchange:
        """The usage fanout exchange and the accounting queue bound to it."""
        exchange = await channel.declare_exchange(
            self.usage_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        await self.declare_dead(channel)
        queue = await self._declare_served(
            channel,
            self.accounting_queue,
            # No team publishes there: a dead letter of accounting's is never dropped on the way.
            self._quorum_args(ACCOUNTING_DELIVERY_LIMIT, strategy="at-least-once"),
        )
        await queue.bind(exchange)
        return exchange
