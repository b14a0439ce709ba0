"""Connecting to RabbitMQ and building messages, the same way in every component."""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import struct
import uuid
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, NamedTuple, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractRobustChannel,
    AbstractRobustConnection,
    DeliveryMode,
)
from aio_pika.message import IncomingMessage, Message, decode_expiration, decode_timestamp
from aio_pika.robust_connection import RobustConnection
from aiormq import spec
from aiormq.abc import ConsumerCallback, DeliveredMessage
from aiormq.exceptions import ChannelInvalidStateError, DeliveryError, PublishError
from pamqp import encode as pamqp_encode
from pamqp.header import ContentHeader
from yarl import URL

from queuegate import channel_close
from queuegate.errors import ConfigError, ServiceUnavailable
from queuegate.messages import CONTENT_TYPE
from queuegate.urls import redact_url

log = logging.getLogger(__name__)

channel_close.apply()

T = TypeVar("T")

CONNECTION_LOST = (ConnectionError, ChannelInvalidStateError)
"""What a publish or settle raises while the connection is down: aiormq's connection errors
(``AMQPConnectionError`` is a ``ConnectionError``) and the closed channel's invalid state."""

RETRY_PAUSE = 0.2
"""Seconds between attempts, so a channel not yet known to be lost is not hammered."""

CONNECT_WITHIN = 15.0
"""Seconds ``connect`` spends trying the nodes of ``QUEUEGATE_AMQP_URL`` before it gives up."""

LOGIN_BYTES = 3500
"""Bytes of a broker user and password together RabbitMQ's login takes at most here: the login
(AMQP's Connection.Start-Ok, with the client's properties, about 300 bytes of aio-pika's) must
fit the 4,096-byte frame allowed before a connection is tuned. A longer one is not refused but
its connection reset unanswered (measured 2026-12-05, RabbitMQ 3.x: 3,786 bytes served, 3,787
reset), which read as a broker that is down."""

CONFIRM_STALL = 10.0
"""Seconds a publish waits for its confirm before its channel is taken for stuck (``publish``):
far above a confirm's time under load here (milliseconds), far below a caller's patience.
Only time its connection is not blocked by a resource alarm counts (``Unblocked``)."""

FRESH_CHANNEL_AFTER = 2.0
"""Seconds of refused publishes after which ``when_connected`` asks for a fresh channel: on
RabbitMQ 3.10 a channel can keep refusing a quorum queue whose leader moved to another node."""

NACK_RETRY = 8.0
"""Seconds a publish the broker refused (nack) is sent again on a cluster before it fails: a
quorum queue whose leader's node died refuses publishes until its members elect a new one
(a few seconds), and that is no reason to fail a job. On one node a nack means a full queue."""


def _short_str(value: str) -> bytes:
    raw = value.encode()
    if len(raw) > 255:
        # As pamqp's: a property too long for AMQP is no message to send.
        raise TypeError("string exceeds maximum length of 255 bytes")
    return _OCTET.pack(len(raw)) + raw


_OCTET = struct.Struct("B")
_FLAGS = struct.Struct(">H")
_ENCODERS: dict[str, Callable[[Any], bytes]] = {
    "shortstr": _short_str,
    "octet": _OCTET.pack,
    "timestamp": pamqp_encode.timestamp,
    "table": pamqp_encode.field_table,
}


class Properties(spec.Basic.Properties):
    """pamqp's message properties, marshalled in one pass with each property's encoder looked
    up once, to the same bytes as pamqp's own: pamqp's ``marshal`` finds each property's type
    by name and dispatches on it again for every message (7 against 2 us a job's properties,
    on every publish)."""

    _fields: ClassVar[tuple[tuple[str, int, Callable[[Any], bytes]], ...]] = tuple(
        (
            name,
            spec.Basic.Properties.flags[name],
            _ENCODERS[getattr(spec.Basic.Properties, f"_{name}")],
        )
        for name in spec.Basic.Properties.__slots__
    )

    def marshal(self) -> bytes:
        flags = 0
        parts = [b""]
        for name, flag, encode in self._fields:
            value = getattr(self, name)
            if value is not None and value != "":
                flags |= flag
                parts.append(encode(value))
        # The 14 properties' flags fit one 16-bit word: no continuation bit.
        parts[0] = _FLAGS.pack(flags)
        return b"".join(parts)


class Outgoing(NamedTuple):
    """A message to publish: its body and its AMQP properties, built once."""

    body: bytes
    properties: spec.Basic.Properties


async def publish(
    channel: AbstractChannel, message: Outgoing, *, exchange: str, routing_key: str
) -> None:
    """Publish ``mandatory``; on a confirming channel, return once the broker confirms it.

    aio-pika's ``Exchange.publish`` holds the channel until the connection's writer has sent
    the frame, so one channel's publishes leave one per turn of the event loop: at hundreds
    of jobs a second they queue behind each other. Here the frame is queued in order and only
    the confirm is awaited. An unroutable message raises ``PublishError`` on a channel opened
    with ``on_return_raises``.

    A confirm that has not come after CONFIRM_STALL seconds of the connection unblocked closes
    the channel as stuck (``ChannelInvalidStateError``, which ``when_connected`` retries); while
    a resource alarm blocks the connection, the publish simply waits (``Unblocked``). A publish
    awaiting its confirm when its channel is closed that way, or renewed (``when_connected``),
    fails with ``ChannelInvalidStateError`` too, as on a lost connection.
    """
    if channel.is_closed:
        # As aio-pika does: a robust channel would otherwise wait for its connection forever.
        raise ChannelInvalidStateError(f"{channel} is closed")
    underlay = await channel.get_underlay_channel()
    assert isinstance(underlay, aiormq.Channel)  # the abstract one lacks ``wait``
    unblocked = Unblocked.of(underlay.connection)
    try:
        async with asyncio.timeout(CONFIRM_STALL if unblocked.is_set() else None) as stall:
            unblocked.pause_while_blocked(stall, CONFIRM_STALL)
            try:
                await underlay.basic_publish(
                    message.body,
                    exchange=exchange,
                    routing_key=routing_key,
                    properties=message.properties,
                    mandatory=True,
                    wait=False,
                )
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # this task is cancelled (or the stall timer fired)
                # aiormq fails a pending confirm with its reader's CancelledError when it finds
                # the connection stuck (missed heartbeats, a frozen node): the connection is
                # lost, which when_connected retries, not this task cancelled (the front door
                # answered 500 to every request publishing at that moment).
                raise ChannelInvalidStateError(
                    "the connection was lost before the confirm"
                ) from None
            except aiormq.exceptions.ChannelClosed as exc:
                if not _closed_from_this_side(exc):
                    raise  # the broker closed it: for this publish, or for want of its exchange
                # A channel closed from this side (stuck, renewed, a call on it cancelled) fails
                # the confirms still pending on it with the ChannelClosed of its Channel.CloseOk,
                # whatever reason the closer gave: the broker refused nothing, the publish is
                # lost with the channel. Raised as it was, it reached the callers of a renewed
                # channel's publishes (a cluster's node lost) instead of being sent again.
                raise ChannelInvalidStateError("the channel was closed before the confirm") from exc
            finally:
                unblocked.forget(stall)
    except TimeoutError:
        # Closing the channel fails its other pending publishes too (sent again by
        # when_connected); a robust channel then reopens on its own.
        stalled = ChannelInvalidStateError(f"no confirm within {CONFIRM_STALL:.0f} s")
        if not underlay.is_closed:
            await underlay.close(stalled)
        raise stalled from None


def _closed_from_this_side(exc: aiormq.exceptions.ChannelClosed) -> bool:
    """Whether aiormq raised ``exc`` at the Channel.CloseOk of a close this side began: it
    gives that one no reply code, while the broker's closes all carry theirs."""
    return type(exc) is aiormq.exceptions.ChannelClosed and exc.args[:1] == (None,)


_UNBLOCKED_EVENT = "_Connection__connection_unblocked"
if _UNBLOCKED_EVENT not in aiormq.Connection.ready.__code__.co_names:
    # Without it a resource alarm would pass for stuck channels: fail loudly at import.
    raise ImportError("aiormq changed how it tracks connection.blocked: queuegate needs aiormq 7")


class Unblocked(asyncio.Event):
    """aiormq's event of a connection not blocked, which also pauses its publishes' stall timers.

    While a memory or disk alarm lasts, RabbitMQ blocks publishing connections
    (connection.blocked): it reads nothing from them and confirms nothing, for minutes. Those
    publishes are not stuck, they wait their turn: closing their channel and sending them again
    would enqueue every one twice, on a broker short of memory. aiormq clears its event at
    connection.blocked and sets it at connection.unblocked but tells no one, so ``of`` puts this
    one in its place; the caller's own timeout still applies.
    """

    def __init__(self, replaced: asyncio.Event) -> None:
        super().__init__()
        self._replaced = replaced
        """Set along with this one, for whoever awaited aiormq's own before it was replaced."""
        self._stalls: dict[asyncio.Timeout, float] = {}
        """The stall timers of the publishes awaiting a confirm, and (while the connection is
        blocked) the seconds each had left when it was blocked."""
        if replaced.is_set():
            super().set()

    @classmethod
    def of(cls, connection: aiormq.abc.AbstractConnection) -> Unblocked:
        event = getattr(connection, _UNBLOCKED_EVENT)
        if not isinstance(event, Unblocked):
            event = cls(event)
            setattr(connection, _UNBLOCKED_EVENT, event)
        return event

    def pause_while_blocked(self, stall: asyncio.Timeout, seconds: float) -> None:
        """Run ``stall`` only while the connection is not blocked (entered with no deadline
        when it is blocked; ``seconds`` are then what it will have once unblocked)."""
        self._stalls[stall] = seconds

    def forget(self, stall: asyncio.Timeout) -> None:
        del self._stalls[stall]

    def clear(self) -> None:
        if self.is_set():
            now = asyncio.get_running_loop().time()
            for stall in self._stalls:
                when = stall.when()
                if when is not None and not stall.expired():
                    self._stalls[stall] = max(0.0, when - now)
                    stall.reschedule(None)
        super().clear()

    def set(self) -> None:
        if not self.is_set():
            now = asyncio.get_running_loop().time()
            for stall, left in self._stalls.items():
                if not stall.expired():
                    stall.reschedule(now + left)
        super().set()
        self._replaced.set()


@dataclass(frozen=True)
class Consumer:
    channel: aiormq.abc.AbstractChannel
    """The underlying channel it consumes on: once the robust channel reopens, a new one."""
    tag: str

    async def cancel(self) -> None:
        await self.channel.basic_cancel(self.tag)


async def consume(
    channel: AbstractRobustChannel,
    queue: str,
    callback: ConsumerCallback,
    *,
    prefetch: int | None = None,
) -> Consumer:
    """Consume ``queue`` on the robust channel's underlying aiormq channel.

    aio-pika would wrap each delivery in a message of its own, every property decoded, and run
    the callback in a second task beside aiormq's, alive as long as the delivery is held (about
    100 us of CPU and 2.7 KB a delivery). Its robust channel restores only the consumers it made
    itself: consume again from the channel's ``reopen_callbacks``, by which time it has
    declared its queues again. ``prefetch`` is a non-global basic.qos, which applies to the
    consumers started after it on the channel.
    """
    underlay = await channel.get_underlay_channel()
    if prefetch is not None:
        await underlay.basic_qos(prefetch_count=prefetch)
    tag = f"ctag.{uuid.uuid4().hex}"
    try:
        await underlay.basic_consume(queue, callback, consumer_tag=tag)
    except BaseException:
        # aiormq keeps the callback of a consume that failed or was cut off (a bound passed
        # on a stalled connection): a broker that then starts the consumer would have its
        # deliveries run, untracked. Unknown, they wait unacknowledged until the channel
        # closes, and go back to the queue.
        if isinstance(underlay, aiormq.Channel):
            underlay.consumers.pop(tag, None)
        raise
    return Consumer(underlay, tag)


_SET = object.__setattr__


class Incoming(IncomingMessage):
    """aio-pika's message of a delivery (what ``consume``'s callbacks wrap it in), made with
    the same values for about a third of the CPU (5-6 against 17 us a delivery).

    aio-pika's ``__init__`` sets each of its 26 fields through ``Message.__setattr__``, a
    Python call and a property read each to check that the message is not locked, which it
    cannot be while it is made. Here each is set as aio-pika decodes it, without that check;
    the message is then locked exactly when aio-pika's would be (``no_ack``, or no tag).
    """

    __slots__ = ()

    def __init__(self, message: DeliveredMessage, no_ack: bool = False) -> None:
        p = message.header.properties
        body = message.body
        _SET(self, "_Message__lock", False)
        _SET(self, "_IncomingMessage__channel", message.channel)
        _SET(self, "_IncomingMessage__no_ack", no_ack)
        _SET(self, "_IncomingMessage__processed", False)
        _SET(self, "body", body)
        _SET(self, "body_size", len(body))
        _SET(self, "headers", p.headers or {})
        _SET(self, "content_type", p.content_type)
        _SET(self, "content_encoding", p.content_encoding)
        mode = int(p.delivery_mode or DeliveryMode.NOT_PERSISTENT)
        _SET(self, "delivery_mode", DeliveryMode(mode))
        _SET(self, "priority", int(p.priority) if p.priority else 0)
        _SET(self, "correlation_id", str(p.correlation_id) if p.correlation_id else None)
        _SET(self, "reply_to", str(p.reply_to) if p.reply_to else None)
        _SET(self, "expiration", decode_expiration(p.expiration))
        _SET(self, "message_id", str(p.message_id) if p.message_id else None)
        _SET(self, "timestamp", decode_timestamp(p.timestamp))
        _SET(self, "type", str(p.message_type) if p.message_type else None)
        _SET(self, "user_id", str(p.user_id) if p.user_id else None)
        _SET(self, "app_id", str(p.app_id) if p.app_id else None)
        _SET(self, "cluster_id", p.cluster_id)
        _SET(self, "consumer_tag", message.consumer_tag)
        _SET(self, "delivery_tag", message.delivery_tag)
        _SET(self, "exchange", message.exchange)
        _SET(self, "message_count", message.message_count)
        _SET(self, "redelivered", message.redelivered)
        _SET(self, "routing_key", message.routing_key)
        if no_ack or not message.delivery_tag:
            self.lock()
            _SET(self, "_IncomingMessage__processed", True)


def _unset_fields() -> set[str]:
    """The fields of aio-pika's message that ``Incoming`` leaves unset, besides the two that
    aio-pika never reads (``_loop``, ``_headers``); a name it sets that aio-pika renamed
    raises AttributeError here (the message has slots only)."""
    probe = Incoming(
        DeliveredMessage(
            delivery=spec.Basic.Deliver(delivery_tag=1),
            header=ContentHeader(properties=spec.Basic.Properties()),
            body=b"",
            channel=None,  # type: ignore[arg-type]  # never read here
        )
    )
    names = set()
    for cls in (Message, IncomingMessage):
        mangled = f"_{cls.__name__}"
        names |= {f"{mangled}{n}" if n.startswith("__") else n for n in cls.__slots__}
    return {name for name in names - {"_loop", "_headers"} if not hasattr(probe, name)}


# A field of aio-pika's left unset would fail only where it is read: fail loudly at import.
if _unset_fields():
    raise ImportError("aio-pika changed its message's fields: queuegate.broker.Incoming needs them")


async def settle(action: Awaitable[object], what: str, logger: logging.Logger) -> bool:
    """Await an ack, nack or reject; False, logged once, if it failed.

    A settle fails only when its channel or connection is gone, and then the broker delivers
    the message again, which every consumer of ours answers idempotently: so a failed settle
    is never an error. A connection that closes without a reason fails a pending settle with
    a bare ``Exception`` (aiormq), so no narrower type covers every way this goes.
    """
    try:
        await action
    except Exception as exc:
        logger.info("could not %s (%s: its channel is gone); it is delivered again", what, exc)
        return False
    return True


class Delivery:
    """What settles a delivery, and nothing else of it: ``ack``, ``nack`` and its id.

    A consumer that holds a message long after reading it (a worker waiting for its
    result's confirm, thousands at once when the broker is the slowest stage) keeps this
    instead: the message's body, properties and aio-pika's object are about 2 KB more. Its
    ``ack`` and ``nack`` fail as the message's own would once the channel is closed.

    Make it as the message arrives, before any other delivery on its channel is settled:
    its channel's ``Settlements`` must know every tag delivered, to acknowledge several at
    once safely. Settle each delivery only through its Delivery.
    """

    __slots__ = ("_settlements", "_tag", "message_id")

    def __init__(self, delivered: DeliveredMessage) -> None:
        self._tag: int | None = delivered.delivery_tag
        self.message_id: str | None = delivered.header.properties.message_id or None
        channel = delivered.channel
        if channel.is_closed:
            self._settlements: Settlements | None = None
        else:
            self._settlements = Settlements.of(channel)
            if self._tag is not None:
                self._settlements.hold(self._tag)

    def held(self) -> bool:
        """Whether its channel is open: once closed (its connection lost), the broker delivers
        the message again, and this one is settled no more."""
        return self._settlements is not None and not self._settlements.closed

    def _open(self, tag: int) -> Settlements:
        if self._settlements is None:
            raise ChannelInvalidStateError(f"the channel of delivery {tag} is closed")
        return self._settlements

    # Settled once: a second ack or nack of one tag would close the channel (PRECONDITION_FAILED)
    # and bring back every delivery on it, where aio-pika's message refused it.
    async def ack(self) -> None:
        tag, self._tag = self._tag, None
        if tag is not None:
            await self._open(tag).ack(tag)

    async def nack(self, *, requeue: bool) -> None:
        tag, self._tag = self._tag, None
        if tag is not None:
            await self._open(tag).nack(tag, requeue=requeue)


_SETTLEMENTS: weakref.WeakKeyDictionary[aiormq.abc.AbstractChannel, Settlements] = (
    weakref.WeakKeyDictionary()
)


class Settlements:
    """One channel's acks and nacks, sent together once per turn of the event loop.

    A usage batch's confirm releases every job it carries at once, and each acked itself: a
    frame, a write and a drain each. The settles of one turn go out together here, and the
    acks of deliveries that, with every tag below them, are all settled go as ONE
    ``basic.ack(multiple)``: fewer frames for the worker to write and RabbitMQ to read and
    apply (a quorum queue's settle is a log entry).

    A multiple ack covers every unsettled tag up to its own on the channel, so it is sent only
    below the lowest tag still held (delivered, not yet settled: in flight, or never settled
    at all) and only while this knows every tag delivered on the channel: tags count up from
    1 with each delivery, so one that does not follow the last seen means a delivery it never
    held, and from then on the channel's acks go one by one. A channel that reopens is another
    channel (its tags start again) with its own Settlements. Nacks go out first, one by one.
    """

    __slots__ = ("_acks", "_channel", "_held", "_nacks", "_order", "_round", "_sender", "_top")

    def __init__(self, channel: aiormq.abc.AbstractChannel) -> None:
        # Weak: this lives (in _SETTLEMENTS) as long as its channel, not the other way round.
        self._channel = weakref.ref(channel)
        self._held: set[int] = set()
        """Tags delivered and not yet settled (nor about to be, in the round being sent)."""
        self._order: deque[int] | None = deque()
        """The held tags in order (with settled ones not yet dropped from its head); None once
        a tag was missed, when no ack covers several."""
        self._top = 0
        self._acks: list[int] = []
        self._nacks: list[tuple[int, bool]] = []
        self._round: asyncio.Future[None] | None = None
        """Resolves once this turn's settles are written (or fail with the channel)."""
        self._sender: asyncio.Task[None] | None = None

    @classmethod
    def of(cls, channel: aiormq.abc.AbstractChannel) -> Settlements:
        settlements = _SETTLEMENTS.get(channel)
        if settlements is None:
            settlements = _SETTLEMENTS[channel] = cls(channel)
        return settlements

    @property
    def closed(self) -> bool:
        channel = self._channel()
        return channel is None or channel.is_closed

    def open_channel(self, tag: int) -> aiormq.abc.AbstractChannel:
        channel = self._channel()
        if channel is None or channel.is_closed:
            raise ChannelInvalidStateError(f"the channel of delivery {tag} is closed")
        return channel

    def hold(self, tag: int) -> None:
        """A delivery arrived: no multiple ack covers it until it is settled."""
        if tag != self._top + 1:
            self._order = None
        elif self._order is not None:
            self._order.append(tag)
        self._top = max(self._top, tag)
        self._held.add(tag)

    def ack(self, tag: int) -> Awaitable[None]:
        self.open_channel(tag)
        self._acks.append(tag)
        return self._join()

    def nack(self, tag: int, *, requeue: bool) -> Awaitable[None]:
        self.open_channel(tag)
        self._nacks.append((tag, requeue))
        return self._join()

    def _join(self) -> Awaitable[None]:
        if self._round is None:
            self._round = asyncio.get_running_loop().create_future()
            if self._sender is None:
                # Runs at the next turn, once every job released with this one has settled.
                self._sender = asyncio.create_task(self._send())
        # Shielded: one settler cancelled must not cancel the others' round.
        return asyncio.shield(self._round)

    async def _send(self) -> None:
        try:
            while self._round is not None:
                done = self._round
                acks, self._acks = self._acks, []
                nacks, self._nacks = self._nacks, []
                self._round = None
                try:
                    await self._write(acks, nacks)
                except Exception as exc:
                    done.set_exception(exc)
                except BaseException:
                    done.cancel()
                    raise
                else:
                    done.set_result(None)
        finally:
            if self._round is not None:
                self._round.cancel()
                self._round = None
            self._sender = None

    async def _write(self, acks: list[int], nacks: list[tuple[int, bool]]) -> None:
        self._held.difference_update(tag for tag, _ in nacks)
        self._held.difference_update(acks)
        channel = self.open_channel(min([*acks, *(tag for tag, _ in nacks)]))
        together: list[int] = []
        if self._order is not None:
            while self._order and self._order[0] not in self._held:
                self._order.popleft()
            lowest_held = self._order[0] if self._order else self._top + 1
            below = [tag for tag in acks if tag < lowest_held]
            if len(below) > 1:
                together = below
                acks = [tag for tag in acks if tag >= lowest_held]
        # In order on the connection's one write queue: the nacks before the multiple ack.
        # Only the last frame waits to be written, which means every one before it was.
        left = len(nacks) + len(acks) + (1 if together else 0)
        for tag, requeue in nacks:
            left -= 1
            await channel.basic_nack(tag, requeue=requeue, wait=left == 0)
        for tag in acks:
            left -= 1
            await channel.basic_ack(tag, wait=left == 0)
        if together:
            await channel.basic_ack(max(together), multiple=True)


def node_urls(url: str) -> list[str]:
    """One URL per node of a cluster URL, whose host part lists them comma-separated.

    ``amqp://u:p@n1:5672,n2:5672/vh`` gives ``amqp://u:p@n1:5672/vh`` and
    ``amqp://u:p@n2:5672/vh``; a URL of one host gives itself. It only splits: each node's
    host and port were checked with the settings (``queuegate.urls.url_problem``).
    """
    parts = urlsplit(url)
    credentials, at, hosts = parts.netloc.rpartition("@")
    return [
        urlunsplit(parts._replace(netloc=f"{credentials}{at}{host.strip()}"))
        for host in hosts.split(",")
    ]


def vhost_of(url: str) -> str:
    """The vhost ``url`` names, as aiormq reads it when it connects: its path after the first
    ``/``, percent-decoded (``%2F`` is ``/``); ``/`` for no path or a bare ``/``.

    Read the same way here, so that what the management API sets up (users' permissions,
    queue policies) lands in the vhost the gateway's connections open.
    """
    path = URL(node_urls(url)[0]).path
    # aiormq.Connection.__init__'s own reading, to the letter: a %2F some yarl versions
    # leave encoded in the path is turned into the / it stands for.
    return "/" if path in ("", "/") else path[1:].replace("%2F", "/")


CLUSTER_HEARTBEAT = 5
"""Seconds of the AMQP heartbeat on a cluster's connections, unless the URL sets one
(``?heartbeat=``). A node that freezes (SIGSTOP, a stalled VM or disk) neither answers nor
closes: only missed heartbeats tell, after about three intervals (aiormq's grace), and
RabbitMQ's default of 60 s held every process on a frozen node for over 100 s while two
healthy nodes waited. 5 s is the low end of RabbitMQ's advice (5-20 s); one node keeps the
broker's default, having no other node to move to."""


def _with_heartbeat(node: str) -> str:
    parts = urlsplit(node)
    if "heartbeat=" in parts.query:
        return node
    query = (
        f"{parts.query}&heartbeat={CLUSTER_HEARTBEAT}"
        if parts.query
        else (f"heartbeat={CLUSTER_HEARTBEAT}")
    )
    return urlunsplit(parts._replace(query=query))


class ClusterConnection(RobustConnection):
    """A robust connection that moves to the next node at each attempt to (re)connect.

    aio-pika's robust connection reconnects to the one URL it was given: when that node dies
    it would wait for it to come back. Each attempt goes through ``__connect_transport``
    (aio-pika 10), so this one turns the URL to the next node first; a node that is down
    costs one failed attempt, and the connection restores its channels, queues and consumers
    on a live node as it does on the same one.
    """

    def __init__(self, nodes: Sequence[str], first: int, **kwargs: Any) -> None:
        super().__init__(URL(nodes[first]), **kwargs)
        self._nodes = [URL(node) for node in nodes]
        self._next = first
        self._draining: set[asyncio.Task[None]] = set()

    async def _RobustConnection__connect_transport(self) -> None:
        self.url = self._nodes[self._next]
        self._next = (self._next + 1) % len(self._nodes)
        await super()._RobustConnection__connect_transport()  # type: ignore[misc]

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        if self.transport is not None and not self._close_called:
            # aiormq's write queue holds 10 frames; once its writer is dead, publishes waiting
            # for room would wait forever. Emptied, they go on to find their channel closed.
            task = asyncio.create_task(_drain(self.transport.connection.write_queue))
            self._draining.add(task)
            task.add_done_callback(self._draining.discard)
        await super()._on_connection_close(closing)


async def _drain(queue: asyncio.Queue[Any]) -> None:
    """Take what is in a dead connection's write queue, and what the publishes waiting for room
    put in as each is let go, until a turn of the event loop brings nothing more: a publish
    that comes later finds its channel closed and queues nothing. (It waited a second of quiet,
    and outlived the event loops of tests that ended within it.)"""
    while True:
        while not queue.empty():
            queue.get_nowait()  # lets one publish waiting for room put its frame in
        # Those let go run before this resumes: each was scheduled first.
        await asyncio.sleep(0)
        if queue.empty():
            return


if not hasattr(RobustConnection, "_RobustConnection__connect_transport"):
    # Without the hook, reconnects would silently stay on a dead node: fail loudly at import.
    raise ImportError("aio-pika changed how it reconnects: queuegate needs aio-pika 10")


async def connect(url: str, *, name: str) -> AbstractRobustConnection:
    """A robust connection to one node of ``url`` (one host, or several comma-separated).

    It starts at a random node, so a cluster's clients spread over its nodes, and tries the
    others in turn within ``CONNECT_WITHIN`` seconds. Once connected, it reconnects by itself
    (to the next node when its own is gone) and restores channels and consumers.
    """
    parts = urlsplit(url)
    login = len(unquote(parts.username or "").encode()) + len(
        unquote(parts.password or "").encode()
    )
    if login > LOGIN_BYTES:
        raise ConfigError(
            f"the broker user and password are {login:,} bytes together, more than RabbitMQ's "
            f"login takes ({LOGIN_BYTES:,}): give the user and password the broker has"
        )
    nodes = node_urls(url)
    if len(nodes) > 1:
        nodes = [_with_heartbeat(node) for node in nodes]
    first = random.randrange(len(nodes))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CONNECT_WITHIN
    failure: BaseException | None = None
    for attempt in range(len(nodes)):
        # Each node its share of what is left, so one that hangs cannot use up the rest's.
        share = (deadline - loop.time()) / (len(nodes) - attempt)
        connection = ClusterConnection(
            nodes, (first + attempt) % len(nodes), client_properties={"connection_name": name}
        )
        try:
            await connection.connect(timeout=share)
        except aiormq.exceptions.ProbableAuthenticationError as exc:
            await connection.close()
            raise ServiceUnavailable(
                f"RabbitMQ at {redact_url(url)} refused the user's password: check it (a "
                "team's is shown once by queuegate teams add; rotate-credentials makes a new one)"
            ) from exc
        except aiormq.exceptions.InvalidFrameError as exc:
            await connection.close()
            if "Connection.OpenOk" not in str(exc) or "Connection.Close" not in str(exc):
                failure = exc
                continue
            # The broker closed the connection as it was opened (NOT_ALLOWED: aiormq keeps
            # only this of it): no node would open it. Before: said as RabbitMQ being down.
            raise ServiceUnavailable(
                f"RabbitMQ at {redact_url(url)} refused to open vhost {vhost_of(url)!r} for "
                "the user: create the vhost and give the user permissions on it "
                "(rabbitmqctl add_vhost, set_permissions), or set QUEUEGATE_AMQP_URL"
            ) from exc
        except (OSError, aio_pika.exceptions.AMQPError) as exc:
            await connection.close()
            failure = exc
            continue
        except asyncio.CancelledError:
            # aio-pika attempts in a task of its own, which this cancel does not reach: left
            # open, it would reconnect for ever after a stop at start-up (a broker that accepts
            # and never answers), and keep asyncio.run from ending. Closing ends that task.
            await connection.close()
            raise
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # A cancel (Ctrl-C) landing while aio-pika connects is swallowed by it: honour it.
            await connection.close()
            raise asyncio.CancelledError
        return connection
    raise ServiceUnavailable(
        f"RabbitMQ is not reachable at {redact_url(url)}: start it "
        "(rabbitmq-server -detached) or set QUEUEGATE_AMQP_URL"
    ) from failure


_RENEWED: weakref.WeakKeyDictionary[AbstractChannel, float] = weakref.WeakKeyDictionary()
"""When each channel was last renewed: its publishers all see the same refusals, one renews."""


async def _renew(channel: AbstractChannel, why: str) -> None:
    """Close the robust channel's underlying channel, so that it reopens a fresh one (once
    per FRESH_CHANNEL_AFTER); its pending publishes fail as on a lost connection."""
    now = asyncio.get_running_loop().time()
    if now - _RENEWED.get(channel, -FRESH_CHANNEL_AFTER) < FRESH_CHANNEL_AFTER:
        return
    _RENEWED[channel] = now
    underlay = await channel.get_underlay_channel()
    if not underlay.is_closed:
        log.info("opening a fresh channel: %s", why)
        await underlay.close(ChannelInvalidStateError(why))


@functools.lru_cache(maxsize=16)
def nack_window(url: str) -> float:
    """Seconds ``when_connected`` sends a refused publish again: NACK_RETRY on a cluster.

    Remembered for each URL: publishers ask it at every publish, where splitting the URL into
    its nodes again cost a client's job about 4 % of its own work."""
    return NACK_RETRY if len(node_urls(url)) > 1 else 0.0


async def when_connected(
    channel: AbstractChannel,
    action: Callable[[], Awaitable[T]],
    *,
    within: float,
    what: str,
    nacks_within: float = 0.0,
    held: Callable[[], bool] | None = None,
) -> T:
    """Run a broker action, retrying it once the robust channel is back after a lost connection.

    Robust connections restore channels, queues and consumers, but never replay a publish that
    failed during the outage: that is the caller's, and this does it. Retry only actions that
    are safe twice (every publish of ours is: job ids make its duplicate harmless). Raises
    ServiceUnavailable when the connection is not back within ``within`` seconds, and the
    lost connection's own error at once when ``held`` says what the action was for is gone
    with it (a delivery it answers, which the broker delivers again). A publish the broker
    refuses (nack) is sent again for ``nacks_within`` seconds (``nack_window``), then its
    DeliveryError raised; one returned unroutable (PublishError) is raised at once.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    refused_since: float | None = None
    while True:
        try:
            return await action()
        except PublishError:
            raise
        except DeliveryError:
            now = loop.time()
            refused_since = now if refused_since is None else refused_since
            if now - refused_since >= nacks_within:
                raise
            log.info("the broker refused a publish while %s; sending it again", what)
            if now - refused_since >= FRESH_CHANNEL_AFTER:
                await _renew(channel, f"refused publishes for {now - refused_since:.0f} s")
            await asyncio.sleep(RETRY_PAUSE)
        except CONNECTION_LOST as exc:
            if held is not None and not held():
                raise
            left = deadline - loop.time()
            if left <= 0:
                raise ServiceUnavailable(
                    f"lost the RabbitMQ connection while {what} and it did not come back "
                    f"within {within:.0f} s: check the broker"
                ) from exc
            log.info("connection lost while %s (%s); waiting for it", what, type(exc).__name__)
            try:
                async with asyncio.timeout(left):
                    await asyncio.sleep(RETRY_PAUSE)
                    if isinstance(channel, AbstractRobustChannel):
                        await channel.ready()
            except TimeoutError:
                continue


def json_message(
    body: bytes,
    *,
    message_type: str,
    message_id: str | None = None,
    correlation_id: str | None = None,
    reply_to: str | None = None,
    user_id: str | None = None,
    expiration_ms: int | None = None,
    headers: Mapping[str, str | int] | None = None,
    persistent: bool = True,
) -> Outgoing:
    """An AMQP message with a JSON body and the properties our components read.

    The properties are pamqp's own, which ``publish`` sends as they are: an ``aio_pika.Message``
    would check each field as it is set, then build them anew (16 against 1.5 us a message).
    """
    properties = Properties(
        content_type=CONTENT_TYPE,
        message_type=message_type,
        message_id=message_id,
        correlation_id=correlation_id,
        reply_to=reply_to,
        user_id=user_id,
        expiration=str(expiration_ms) if expiration_ms is not None else None,
        headers=dict(headers) if headers else None,
        timestamp=datetime.now(UTC),
        delivery_mode=DeliveryMode.PERSISTENT if persistent else DeliveryMode.NOT_PERSISTENT,
    )
    return Outgoing(body, properties)
