"""The dead-letter queues, for operators: what is in them, why, and sending it back.

Each team's dead letters land in its own ``<ns>.dead.<team>``, accounting's in ``<ns>.dead``
(and every team's, from versions before per-team queues); the tools read every queue bound to
``<ns>.dead.teams``, found through the management API (of one team, those that can hold its
letters). Two kinds of dead letter land there. The broker dead-letters a job that outlived
its TTL (``expired``: no worker took it before its deadline) or ran out of its queue's
safety-net deliveries (``delivery_limit``, while workers could not count failures), recording
where from in its ``x-death`` header. A worker
dead-letters bad input, and a job past ``QUEUEGATE_DELIVERY_LIMIT`` failures
(``delivery_limit``: it kept crashing or failing workers), itself, with its
``x-queuegate-reason``/``-detail``/``-queue``/``-user`` headers, under its own broker user as
``user_id``.

Where a letter came from decides where a replay sends it, so only what no team can forge is
believed: the broker's latest ``x-death`` entry, or a worker's headers on a letter whose
broker-validated ``user_id`` is an operator's (``Settings.operators``). A team's message keeps
whatever headers the team set (an ``x-queuegate-queue`` naming accounting, a forged
``x-death`` entry behind the broker's own): they are shown, never followed. A letter of unknown
origin is not replayed; one from ``<ns>.accounting`` is replayed to the usage exchange only if
a worker published it.

Replay publishes the original body, ``message_id``, ``correlation_id`` and ``reply_to`` back to
its team's queue under the operator's own ``user_id``, naming the user it was first published
under (``x-queuegate-replay-of``) and why it was first dead-lettered: the worker proves that
first publisher again (``workers.identity``), and a second refusal keeps the first cause. The
job id is kept, so a job whose outcome was stored before it died (a ``delivery_limit`` job
whose dead owners' calls were billed) is answered from it and never counted twice; the dead
letter is removed only once the broker confirmed the publish. A letter a worker answered as it
last dead-lettered it (bad input: ``unknown_model``, ``invalid_request``, ``unauthorized``,
``idempotency_conflict``) is not replayed, whatever was fixed since: under its job id it could
only be answered that error again, or be answered a second time, which its caller's client
drops (it keeps a job's first result). It stays a dead letter; its request, submitted anew under
a new job id, is served and accounted under that id.

Reading the queue takes the messages without acknowledging them and returns them, one at a
time in their order, a batch at a time (``_returned_in_order``), so that reading keeps it; their
``x-delivery-count`` then grows (quorum queues count every return), so
it is left out of what is shown: ``deaths`` is the broker's own count in ``x-death``. (The
queue's delivery limit is set out of reach, so that reading never drops a letter.)

Two commands reading a queue at once would each take part of its letters, and return them in
another order, so each holds the queue's lock while it reads it: an exclusive queue,
``<ns>.dlq.lock`` for ``<ns>.dead`` (earlier versions' one lock of every queue),
``<ns>.dlq.lock.<team>`` for ``<ns>.dead.<team>``, which the broker refuses to any other
connection (405 RESOURCE_LOCKED) and deletes with its holder's connection, a killed process's
included. A second command tries again until ``Settings.dlq_lock_wait`` has passed, then gives
up in one line. A command reads one queue after another, in name order, and holds a queue's
lock only while it reads it, so that commands about different teams do not wait on each other
(``drop`` without ``--team`` looks for the id first, then drops it from the queues found
holding it alone); taken in name order, no two commands' locks can
each wait for the other's. A command about one team reads only the queues that can hold its letters
(``_of_team``), and a list stops reading once it has its ``limit``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import aiormq
import asyncpg
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)

from queuegate.broker import connect, json_message, publish
from queuegate.db import connection
from queuegate.errors import BAD_INPUT, ConfigError
from queuegate.management import BrokerAdmin
from queuegate.registry import TEAM_NAME, check_team_name, team_exists
from queuegate.settings import Settings
from queuegate.signing import KEY_ID_HEADER, PROOF_HEADER
from queuegate.topology import (
    BROKER_DEAD_REASONS,
    HEADER_DEAD_DETAIL,
    HEADER_DEAD_QUEUE,
    HEADER_DEAD_REASON,
    HEADER_DEAD_TRUNCATED,
    HEADER_DEAD_UNANSWERED,
    HEADER_DEAD_USER,
    HEADER_FIRST_DETAIL,
    HEADER_FIRST_REASON,
    HEADER_REPLAY_OF,
    HEADER_SENT_MS,
    MESSAGE_TYPE_JOB,
    WORKER_DEAD_REASONS,
    Topology,
    header_text,
)
from queuegate.visible import clipped

log = logging.getLogger(__name__)

RETURN_BATCH = 32
"""Letters returned to a queue before waiting for it to have taken them back: RabbitMQ 3.10's
quorum queue puts back up to 32 returned at once in their order, more in an order of its own
(see _returned_in_order)."""
RETURN_WAIT = 5.0
"""Seconds a read of the dead letters waits at most for a batch of the letters it returned to
be back in their queue (milliseconds on a quorum queue)."""
RETURN_POLL = 0.001
"""Seconds before asking again at first; doubled each time up to RETURN_POLL_MAX, so that a
batch that never comes back (another reader holds it) is not asked after a thousand times a
second for RETURN_WAIT."""
RETURN_POLL_MAX = 0.05
LOCK_POLL = 0.05
"""Seconds a command waits, at first, before it asks for the lock again; doubled each time,
up to LOCK_POLL_MAX, so a long wait does not hammer the broker."""
LOCK_POLL_MAX = 1.0

UNKNOWN = "unknown"
"""The reason of a letter nothing trustworthy explains."""
REASONS = WORKER_DEAD_REASONS | BROKER_DEAD_REASONS | {UNKNOWN}
"""Why a letter can be dead: a worker's or the broker's reason, or ``UNKNOWN``."""

_REPLAYED_HEADERS = (KEY_ID_HEADER, PROOF_HEADER, HEADER_SENT_MS)
"""The only headers of a dead letter a replay carries over (the rest describe its death or
were set by whoever published it, and a replay under an operator's user_id must not lend
them that trust)."""


@dataclass(frozen=True)
class DeadLetter:
    """One dead-lettered message and why it is there."""

    position: int
    """Its place, from 1, among the letters a command read and wanted."""
    message_id: str | None
    reason: str
    """The first cause: ``invalid_request``, ``unknown_model``, ``unauthorized`` (worker),
    ``delivery_limit`` (worker, or broker), ``expired``, ``rejected`` (broker); ``unknown``
    when unproven."""
    detail: str
    then: str | None
    """Why a replay of it was dead-lettered again (reason: detail), when it was."""
    queue: str
    """The queue it was dead-lettered from, as the broker or a worker recorded it ("" when
    nothing trustworthy says: such a letter is not replayed)."""
    team: str | None
    """The team whose job queue that is; None for accounting or an unknown origin."""
    deaths: int
    """How many times it was dead-lettered from that queue (the broker's count, or 1 for a
    worker's refusal)."""
    at: datetime | None
    headers: Mapping[str, Any]
    body: bytes
    reply_to: str | None
    user_id: str | None
    truncated: int | None
    """The original body's size when a worker cut the kept body short."""
    unanswered: bool = False
    """Whether the refusal a worker dead-lettered it with last reached no reply queue (none
    named, or it was gone or full): as a worker records it."""

    @property
    def refused(self) -> str | None:
        """The error a worker refused the job with as it last dead-lettered it (bad input,
        ``BAD_INPUT``), which keeps it from replay (see above), whether or not that answer
        reached its caller; None for a job that died unanswered (``expired``,
        ``delivery_limit``…)."""
        latest = _then(self) or self.reason
        return latest if latest in BAD_INPUT else None

    @property
    def answered(self) -> str | None:
        """``refused``, when that answer reached the job's reply queue."""
        return None if self.unanswered else self.refused


async def peek(
    settings: Settings,
    *,
    limit: int | None = None,
    team: str | None = None,
    reason: str | None = None,
) -> tuple[list[DeadLetter], int]:
    """Up to ``limit`` dead letters (of ``team``, for ``reason``), oldest first in each queue,
    left where they are; and how many the queues hold in all. Of ``team``, only the
    queues that can hold its letters are read (``_of_team``); each is read under its own
    lock, and no further than its ``limit``-th letter wanted."""

    def wanted(letter: DeadLetter) -> bool:
        return (team is None or letter.team == team) and (
            reason is None or reason in (letter.reason, _then(letter))
        )

    if reason is not None and reason not in REASONS:
        raise ConfigError(
            f"no dead letter is listed for the reason {clipped(reason)!r}: give one of "
            f"{', '.join(sorted(REASONS))}"
        )
    async with _reading(settings) as reader:
        every = await _dead_queues(reader)
        # Those read counted as they are read, so that none read is left out; the others
        # without their locks.
        depths: dict[str, int] = {}
        read = _letters(
            reader, await _of_team(reader, every, team), wanted, limit=limit, depths=depths
        )
        letters = [x.letter async for x in read]
        for name in every:
            if name not in depths:
                depths[name] = await _ready(reader.underlay, name)
    return letters, sum(depths.values())


def find(letters: Collection[DeadLetter], wanted: str) -> DeadLetter:
    """The letter whose id is ``wanted`` or starts with it; ConfigError unless exactly one."""
    exact = [x for x in letters if x.message_id == wanted]
    found = exact or [x for x in letters if x.message_id and x.message_id.startswith(wanted)]
    if not found:
        raise ConfigError(
            f"no dead letter with id {clipped(wanted)!r}: list them with queuegate dlq list"
        )
    if len(found) > 1:
        raise ConfigError(
            f"{len(found)} dead letters have ids starting with {clipped(wanted)!r}: "
            "give more of the id"
        )
    return found[0]


async def replay(
    settings: Settings,
    job_ids: Collection[str] | None = None,
    *,
    on_replayed: Callable[[DeadLetter], None] | None = None,
) -> tuple[list[DeadLetter], list[tuple[DeadLetter, str]]]:
    """Send dead letters back where they came from (all, or those of ``job_ids``).

    Returns those replayed and those left dead-lettered, each with why. Each is removed only
    after the broker confirmed its republication. ConfigError, no letter taken, when an
    exchange it publishes to is missing (``_replayable_to``).
    """
    operator = settings.amqp_user
    if operator is None:
        raise ConfigError(
            "replay publishes as an operator: put the broker user in QUEUEGATE_AMQP_URL"
        )
    replayed: list[DeadLetter] = []
    refused: list[tuple[DeadLetter, str]] = []

    def wanted(letter: DeadLetter) -> bool:
        return job_ids is None or letter.message_id in job_ids

    async with _reading(settings) as reader:
        names = await _dead_queues(reader)
        await _replayable_to(reader)
        async with contextlib.aclosing(_letters(reader, names, wanted)) as letters:
            async for read in letters:
                why = await _replay_one(reader, read, operator)
                if why is not None:
                    refused.append((read.letter, why))
                    continue
                replayed.append(read.letter)
                if on_replayed is not None:
                    on_replayed(read.letter)
    return replayed, refused


async def _replayable_to(reader: _Reader) -> None:
    """ConfigError unless the exchanges a replay publishes to are there, checked before it
    takes a letter: a publish to a missing one is refused (404) with the channel it was made
    on, mid-replay, and the letters held then go back in an order of the queue's own."""
    topology = Topology.of(reader.settings)
    # The channel a passive declare is refused on is closed: not the one letters are read on.
    async with reader.connection.channel() as channel:
        underlay = await channel.get_underlay_channel()
        for name in (topology.jobs_exchange, topology.usage_exchange):
            try:
                await underlay.exchange_declare(name, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                raise ConfigError(
                    f"the exchange {clipped(name)!r} a replay publishes to is missing: start "
                    "a worker, which declares it, then replay again (no dead letter was taken)"
                ) from None


async def _replay_one(reader: _Reader, read: _Letter, operator: str) -> str | None:
    """Send a letter back where it came from, and acknowledge (delete) it once the broker
    confirmed the publish; or why it is left dead-lettered."""
    settings, letter, message = reader.settings, read.letter, read.message
    topology = Topology.of(settings)
    if letter.truncated is not None:
        return f"its body was cut from {letter.truncated:,} bytes"
    if (why := kept_why(letter)) is not None:
        return why
    if letter.queue == topology.accounting_queue and _trusted(message, settings):
        exchange, key = topology.usage_exchange, ""
    elif letter.team is not None:
        exchange, key = topology.jobs_exchange, letter.team
    else:
        return _unreplayable(letter, topology)
    again = json_message(
        message.body,
        message_type=message.type or MESSAGE_TYPE_JOB,
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        user_id=operator,
        headers=_replay_headers(letter, message, settings),
    )
    try:
        await publish(reader.channel, again, exchange=exchange, routing_key=key)
    except aiormq.exceptions.PublishError:
        return f"no queue takes it: register the team (queuegate teams add {key})"
    await message.ack()
    return None


def kept_why(letter: DeadLetter) -> str | None:
    """Why a letter a worker refused as it last died is not replayed, and what is left of it;
    None for one that died unanswered."""
    if letter.refused is None:
        return None
    if not letter.unanswered:
        return (
            f"answered {letter.refused} when it died, and a replay would send that answer "
            "again: have its caller submit the request anew (a new job id) to be served"
        )
    # Not sent again either: a worker would refuse it again, to no one.
    done = "replayed, then refused" if letter.then else "refused"
    return (
        f"{done} {letter.refused}, an answer that reached no one (its reply "
        "queue gone, full or never named): its outcome is kept only as its usage row (and "
        "its stored result, where it was called), under its job id; remove the letter with "
        f"queuegate dlq drop {letter.message_id or ''}"
    )


async def drop(settings: Settings, job_id: str, *, team: str | None = None) -> list[DeadLetter]:
    """Delete the dead letters of ``job_id`` (its whole id: copies of one job share it) of one
    team, the others left as they were, in their order; ConfigError when none has it, or
    when letters of several teams have it and ``team`` does not say whose (teams choose
    their own job ids: one team's must not take another's letter with it).

    Without ``team``, the queues are first searched, each under its lock only while it is
    read, for whose letters have the id; then those of the one team that has it are dropped
    as with ``team``, from the queues found holding them alone: a drop named by its id holds
    no lock of its letter's queue while it reads other teams' (maybe flooded) queues."""
    async with _reading(settings) as reader:
        names = await _of_team(reader, await _dead_queues(reader), team)
        whose: str | None = team
        if team is None:
            holders = await _holders(reader, names, job_id)
            teams = set().union(*holders.values())
            if len(teams) > 1:
                listed = sorted(x or "no team" for x in teams)
                raise ConfigError(
                    f"dead letters of {len(listed)} teams have the id {clipped(job_id)!r} "
                    f"({', '.join(listed)}): name one with --team"
                )
            names = list(holders)  # none when no letter has it: refused below
            whose = next(iter(teams), None)
        dropped = await _dropped(reader, names, job_id, whose)
    if not dropped:
        of = f" of team {team}" if team is not None else ""
        raise ConfigError(
            f"no dead letter{of} has the id {clipped(job_id)!r} (give it whole): list them "
            "with queuegate dlq list"
        )
    return dropped


async def _holders(reader: _Reader, names: list[str], job_id: str) -> dict[str, set[str | None]]:
    """Of the dead-letter queues ``names``, those holding letters of ``job_id``, and the
    teams those are of; each read under its lock, released once it is read."""
    holders: dict[str, set[str | None]] = {}
    async for read in _letters(reader, names, lambda letter: letter.message_id == job_id):
        holders.setdefault(read.queue, set()).add(read.letter.team)
    return holders


async def _dropped(
    reader: _Reader, names: list[str], job_id: str, team: str | None
) -> list[DeadLetter]:
    """Acknowledge (delete) the letters of ``job_id`` of ``team`` (None: of no team) in the
    queues ``names``, each read under its own lock, released once it is read."""

    def wanted(letter: DeadLetter) -> bool:
        return letter.message_id == job_id and letter.team == team

    dropped: list[DeadLetter] = []
    async with contextlib.aclosing(_letters(reader, names, wanted)) as letters:
        async for read in letters:
            await read.message.ack()
            dropped.append(read.letter)
    return dropped


async def purge(settings: Settings) -> int:
    """Delete every dead letter of every queue; returns how many there were."""
    purged = 0
    async with _reading(settings) as reader:
        for name in await _dead_queues(reader):
            async with _locked(reader, name):
                done = await reader.underlay.queue_purge(name)
                purged += int(done.message_count or 0)
    return purged


@dataclass(frozen=True)
class _Reader:
    """A connection of a dead-letter command's, and the channel it reads on."""

    settings: Settings
    connection: AbstractRobustConnection
    channel: AbstractChannel
    underlay: aiormq.abc.AbstractChannel
    """The channel's own: a robust one answers a passive declare from memory, and would take
    a lock again after a reconnect, when another command may be reading."""


async def _dead_queues(reader: _Reader) -> list[str]:
    """Every dead-letter queue, in name order (the order their locks are taken in, so that two
    commands never wait on each other's): those bound to ``<ns>.dead.teams`` (a team's of any
    version, enabled or not, as long as its queue is bound). Declares nothing: ConfigError
    when the namespace has none (misspelled, or no worker ever started)."""
    settings = reader.settings
    topology = Topology.of(settings)
    async with BrokerAdmin.of(settings) as admin:
        names = await admin.bound_queues(topology.dead_teams_exchange)
    if topology.dead_queue not in names:
        raise ConfigError(
            f"namespace {clipped(settings.namespace)!r} (QUEUEGATE_NAMESPACE) has no "
            "dead-letter queues: check its spelling, or start a worker or run queuegate teams "
            "add TEAM, which declare them"
        )
    return names


async def _of_team(reader: _Reader, names: list[str], team: str | None) -> list[str]:
    """Of the dead-letter queues ``names``, those that can hold ``team``'s letters (all when
    None): its own ``<ns>.dead.<team>``, and ``<ns>.dead``, which holds every team's letters
    from versions before per-team queues (and while one runs). Another team's queue holds a
    letter of the team only when the broker dead-lettered its job under a ``CC`` key too,
    which its quota policy (``teams add``) ends, and then the team's own holds it as well.
    ConfigError for a team with no queue there that the registry does not know either."""
    if team is None:
        return names
    topology = Topology.of(reader.settings)
    own = topology.team_dead_queue(check_team_name(team))
    if own not in names and not await _registered(reader.settings, team):
        raise ConfigError(
            f"no team {clipped(team)!r} has dead letters or is registered: list the teams "
            "with queuegate teams list"
        )
    return [name for name in names if name in (topology.dead_queue, own)]


async def _registered(settings: Settings, team: str) -> bool:
    try:
        async with connection(settings) as conn:
            return await team_exists(conn, team)
    except asyncpg.UndefinedTableError:
        return False  # a schema accounting never migrated: no team was ever added


@contextlib.asynccontextmanager
async def _reading(settings: Settings) -> AsyncIterator[_Reader]:
    connection = await connect(settings.amqp_url, name="queuegate-dlq")
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        yield _Reader(settings, connection, channel, await channel.get_underlay_channel())


class _Letter(NamedTuple):
    """A letter as read, held unacknowledged, and the dead-letter queue it is held from."""

    queue: str
    letter: DeadLetter
    message: AbstractIncomingMessage


async def _letters(
    reader: _Reader,
    names: list[str],
    wanted: Callable[[DeadLetter], bool] | None = None,
    *,
    limit: int | None = None,
    depths: dict[str, int] | None = None,
) -> AsyncGenerator[_Letter, None]:
    """The letters of the dead-letter queues ``names`` that ``wanted`` says are (all when
    None), oldest first in each queue, numbered from 1, up to ``limit``: each queue read in its
    turn (``_held``) under its own lock, and no further than the letter the ``limit`` needs.
    Those of a queue not acknowledged as they are given go back to it, in their order, before
    the next queue is read. ``depths`` gets how many letters each queue read held.

    Left before its end, it is to be closed at once (``contextlib.aclosing``): until then it
    holds a queue's lock and letters."""
    given = 0
    for name in names:
        left = None if limit is None else limit - given
        if left == 0:
            break
        async with _held(reader, name, wanted, left, first=given + 1) as (letters, depth):
            if depths is not None:
                depths[name] = depth
            for letter in letters:
                given += 1
                yield letter


@contextlib.asynccontextmanager
async def _held(
    reader: _Reader,
    name: str,
    wanted: Callable[[DeadLetter], bool] | None = None,
    limit: int | None = None,
    *,
    first: int = 1,
) -> AsyncIterator[tuple[list[_Letter], int]]:
    """The letters of the queue ``name`` that ``wanted`` says are (all when None), numbered
    from ``first``, under its lock: every letter taken and held unacknowledged, up to the
    ``limit``-th wanted; and how many the queue held. What is not acknowledged goes back to
    the queue, in its order, before the lock is released."""
    async with _locked(reader, name):
        taken: list[AbstractIncomingMessage] = []
        chosen: list[_Letter] = []
        queue = await reader.channel.get_queue(name, ensure=False)
        # Its count bounds the loop: a message returned meanwhile is not taken twice.
        depth = await _ready(reader.underlay, name)
        for _ in range(depth):
            if limit is not None and len(chosen) >= limit:
                break
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            taken.append(message)
            letter = _describe(first + len(chosen), message, reader.settings)
            if wanted is None or wanted(letter):
                chosen.append(_Letter(name, letter, message))
        try:
            yield chosen, depth
        finally:
            if not reader.channel.is_closed:
                # What was acknowledged is gone; the rest must be back, in its order, before
                # the next read.
                await _returned_in_order(reader.underlay, name, taken)


@contextlib.asynccontextmanager
async def _locked(reader: _Reader, name: str) -> AsyncIterator[None]:
    """Hold the lock of the dead-letter queue ``name`` (see above), waiting for another
    command's to go; ConfigError once it waited ``settings.dlq_lock_wait`` in vain."""
    settings = reader.settings
    lock = Topology.of(settings).dead_lock_queue(name)
    until = time.monotonic() + settings.dlq_lock_wait
    pause = LOCK_POLL
    while True:
        # The broker closes the channel it refuses the lock on: each attempt on a new one.
        async with reader.connection.channel() as channel:
            underlay = await channel.get_underlay_channel()
            try:
                await underlay.queue_declare(lock, exclusive=True)
                break
            except aiormq.exceptions.ChannelLockedResource:
                pass
        if pause == LOCK_POLL:  # once: why a command stalls, when debugging
            log.debug("waiting for %s: another dlq command holds it", lock)
        left = until - time.monotonic()
        if left <= 0:
            raise ConfigError(
                f"another queuegate dlq command is reading the dead letters (it holds {lock}) "
                f"and did not end within {settings.dlq_lock_wait:g} s: run this one again once "
                "it ends (or raise QUEUEGATE_DLQ_LOCK_WAIT)"
            )
        await asyncio.sleep(min(pause, left))
        pause = min(pause * 2, LOCK_POLL_MAX)
    try:
        yield
    finally:
        if not reader.underlay.is_closed:
            await reader.underlay.queue_delete(lock)


async def _returned_in_order(
    underlay: aiormq.abc.AbstractChannel, name: str, taken: list[AbstractIncomingMessage]
) -> None:
    """Return to the queue ``name`` what was taken from it and not acknowledged, one at a time
    in the order taken, at most RETURN_BATCH before the queue has taken them back.

    Left to the channel's close, a quorum queue puts many back in an order of its own (twelve
    came back ``1 7 8 … 12 2 … 6``). Returned one by one it puts each back ahead of those not
    taken, in the order returned, and a classic queue puts it back where it was, so oldest
    first they keep their order either way; but only while the queue applies them one by one.
    RabbitMQ 3.10's quorum queue client, in the channel, sends every return made while 32 of
    its commands are unapplied in one command once they are (``rabbit_fifo_client``'s soft
    limit), and the queue applies a return of more than 32 letters in its map's hash order
    (``rabbit_fifo``, ``maps:with``/``maps:fold``; 32 keys or fewer iterate sorted, by the
    order taken): 150 letters came back with 120 out of place. Waiting after each batch for
    the queue to hold it keeps every return at 32 letters or fewer.

    Waiting is also what makes a read right after (``dlq list`` after ``dlq drop``) find every
    letter: a quorum queue takes letters back after the channel has answered."""
    left = [message for message in taken if not message.processed]
    ready = await _ready(underlay, name)
    for start in range(0, len(left), RETURN_BATCH):
        batch = left[start : start + RETURN_BATCH]
        for message in batch:
            await message.nack(requeue=True)
        ready += len(batch)
        if not await _until_ready(underlay, name, ready):
            # Another reader holds some (one taking no lock: an earlier version's dlq
            # command, run beside this one): not an error, and no use waiting again.
            log.debug("%s holds fewer letters than were returned to it", name)
            for message in left[start + RETURN_BATCH :]:
                await message.nack(requeue=True)
            return


async def _ready(underlay: aiormq.abc.AbstractChannel, name: str) -> int:
    """How many letters the queue holds ready: on the underlying channel, as a robust one
    answers a passive declare from memory."""
    return (await underlay.queue_declare(name, passive=True)).message_count or 0


async def _until_ready(underlay: aiormq.abc.AbstractChannel, name: str, expected: int) -> bool:
    """Whether the queue held ``expected`` letters ready within RETURN_WAIT (the broker offers
    no event to await)."""
    until = time.monotonic() + RETURN_WAIT
    pause = RETURN_POLL
    while await _ready(underlay, name) < expected:
        if time.monotonic() >= until:
            return False
        await asyncio.sleep(pause)
        pause = min(pause * 2, RETURN_POLL_MAX)
    return True


def _trusted(message: AbstractIncomingMessage, settings: Settings) -> bool:
    """Published by an operator or worker: the broker validated a user_id no team can use."""
    return bool(message.user_id) and message.user_id in settings.operators


def _describe(position: int, message: AbstractIncomingMessage, settings: Settings) -> DeadLetter:
    headers = {k: v for k, v in (message.headers or {}).items() if k != "x-delivery-count"}
    trusted = _trusted(message, settings)
    death = _latest_death(headers)
    reason, detail, queue, deaths, at = UNKNOWN, "", "", 0, message.timestamp
    if death is not None:
        # The broker puts its newest entry first; entries a team forged sit behind it.
        reason = header_text(death.get("reason")) or reason
        queue = header_text(death.get("queue")) or ""
        count = death.get("count")
        deaths = count if isinstance(count, int) else 1
        at = death["time"] if isinstance(death.get("time"), datetime) else at
    elif trusted and HEADER_DEAD_REASON in headers:
        reason = header_text(headers[HEADER_DEAD_REASON]) or reason
        detail = header_text(headers.get(HEADER_DEAD_DETAIL)) or ""
        queue = header_text(headers.get(HEADER_DEAD_QUEUE)) or ""
        deaths = 1
    then = None
    first = header_text(headers.get(HEADER_FIRST_REASON)) if trusted else None
    if first is not None:
        then = f"{reason}: {detail}" if detail else reason
        reason, detail = first, header_text(headers.get(HEADER_FIRST_DETAIL)) or ""
    truncated = headers.get(HEADER_DEAD_TRUNCATED) if trusted else None
    unanswered = trusted and HEADER_DEAD_UNANSWERED in headers
    return DeadLetter(
        position=position,
        message_id=message.message_id,
        reason=reason,
        detail=detail,
        then=then,
        queue=queue,
        team=_team_of(queue, settings),
        deaths=deaths,
        at=at,
        headers=headers,
        body=message.body,
        reply_to=message.reply_to,
        user_id=message.user_id,
        truncated=truncated if isinstance(truncated, int) else None,
        unanswered=unanswered,
    )


def _latest_death(headers: Mapping[str, Any]) -> Mapping[str, Any] | None:
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping):
        return deaths[0]
    return None


def _team_of(queue: str, settings: Settings) -> str | None:
    team = queue.removeprefix(f"{settings.namespace}.jobs.")
    return team if team != queue and TEAM_NAME.fullmatch(team) else None


def _then(letter: DeadLetter) -> str | None:
    return letter.then.split(":", 1)[0] if letter.then else None


def _unreplayable(letter: DeadLetter, topology: Topology) -> str:
    if not letter.queue:
        return "nothing the broker or a worker recorded says where it came from"
    if letter.queue == topology.accounting_queue:
        return (
            f"it came from accounting, but was published by {letter.user_id or 'nobody'}, "
            "no worker (see QUEUEGATE_OPERATOR_USERS)"
        )
    return f"it came from {letter.queue}, which is no team's job queue"


def _replay_headers(
    letter: DeadLetter, message: AbstractIncomingMessage, settings: Settings
) -> dict[str, str | int]:
    headers = {
        name: value
        for name in _REPLAYED_HEADERS
        if isinstance(value := letter.headers.get(name), str | int)
    }
    # Who first published it, for the worker to prove again: a worker's letter says so in its
    # own header; a replayed job names its first publisher already; else the broker's user_id.
    first = message.user_id or ""
    if _trusted(message, settings):
        recorded = letter.headers.get(HEADER_REPLAY_OF, letter.headers.get(HEADER_DEAD_USER))
        first = (header_text(recorded) or "") if recorded is not None else first
    headers[HEADER_REPLAY_OF] = first or ""
    headers[HEADER_FIRST_REASON] = letter.reason
    headers[HEADER_FIRST_DETAIL] = letter.detail
    return headers


__all__ = ["DeadLetter", "drop", "find", "kept_why", "peek", "purge", "replay"]
