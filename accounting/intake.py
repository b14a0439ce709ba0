"""A consume-only AMQP 0-9-1 connection: one channel, one consumer, deliveries in batches.

aiormq reads every frame with three awaited reads, queues it per channel, decodes every
property and runs a task per delivery: 50-66 us of CPU per message on the bench machine,
which alone capped accounting below 20,000 events/s. Here a protocol callback cuts the frames
out of what arrived, reads only each delivery's tag and body, and hands a whole read's
deliveries over at once (3-4 us per message). Everything else (handshake, settlements,
close) uses pamqp's frames. Declarations stay with aio-pika: they are not on the hot path.
"""

from __future__ import annotations

import asyncio
import ssl
import struct
from base64 import b64decode
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast
from urllib.parse import SplitResult, parse_qsl, unquote, urlsplit

from pamqp import commands, frame, header, heartbeat
from pamqp.base import Frame
from pamqp.body import ContentBody

HEARTBEAT = 60
"""Seconds between heartbeats we ask for (the broker may ask for fewer); aiormq's default."""

HANDSHAKE_TIMEOUT = 10.0
"""Seconds to connect, log in and start consuming."""

CLOSE_TIMEOUT = 5.0
"""Seconds a close waits for the broker's Close-Ok before dropping the socket."""

CHANNEL = 1
F = TypeVar("F", bound=Frame)
T = TypeVar("T")
_FRAME_HEAD = struct.Struct(">BHI")
_U64 = struct.Struct(">Q")
_FRAME_END = 0xCE
_METHOD, _HEADER, _BODY, _HEARTBEAT = 1, 2, 3, 8
_DELIVER = b"\x00\x3c\x00\x3c"  # Basic.Deliver: class 60, method 60


def tls_context(parts: SplitResult) -> ssl.SSLContext | None:
    """TLS for an ``amqps`` URL as aiormq sets it up from the same URL, so that the accountant's
    declaring and consuming connections reach a broker alike: its query's ``cafile``,
    ``capath``, ``cadata`` (base64), ``certfile`` and ``keyfile``, and ``no_verify_ssl=1``."""
    if parts.scheme != "amqps":
        return None
    query = dict(parse_qsl(parts.query))
    cadata = query.get("cadata")
    context = ssl.create_default_context(
        cafile=query.get("cafile"),
        capath=query.get("capath"),
        cadata=b64decode(cadata) if cadata else None,
    )
    if certfile := query.get("certfile"):
        context.load_cert_chain(certfile, query.get("keyfile"))
    if query.get("no_verify_ssl", "0") != "0":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class IntakeClosed(ConnectionError):
    """The connection is closed: by us, the broker, or the network."""


# Not frozen: a frozen dataclass takes 3.5x as long to build, and one is built per message.
@dataclass(slots=True)
class Delivery:
    tag: int
    body: bytes
    header: bytes
    """The content header frame's payload, decoded only when needed (``message_id``)."""

    def message_id(self) -> str | None:
        content = header.ContentHeader()
        content.unmarshal(self.header)
        message_id: str | None = content.properties.message_id
        return message_id


OnDeliveries = Callable[["Intake", list[Delivery]], None]


class Intake(asyncio.Protocol):
    """Consumes one queue; ``on_deliveries`` gets each read's deliveries, in delivery order.

        intake = await Intake.open(url, queue, prefetch, on_deliveries, name="accounting")
        intake.ack(tag, multiple=True)       # written at once, in the order called
        await intake.closed                  # the reason it closed (None: closed by us)
        await intake.close()

    Settlements are plain writes, so they reach the broker in the order they are made. A
    broker's cancel of the consumer (its queue deleted) or channel close closes the whole
    connection: the caller opens a new one, which declares and consumes again.
    """

    def __init__(self, on_deliveries: OnDeliveries) -> None:
        self._on_deliveries = on_deliveries
        self._buffer = bytearray()
        self._replies: asyncio.Queue[Frame] = asyncio.Queue()
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[BaseException | None] = self._loop.create_future()
        """Resolved with why the connection ended (None when we closed it)."""
        self.consumer_tag: str | None = None
        self._cancelled: asyncio.Future[None] = self._loop.create_future()
        self._closing = False
        # The delivery being assembled: its tag, header and body parts still to come.
        self._tag = 0
        self._header = b""
        self._parts: list[bytes] = []
        self._remaining = 0
        self._heartbeat = 0
        self._last_received = 0.0
        self._beat: asyncio.TimerHandle | None = None

    @classmethod
    async def open(
        cls,
        url: str,
        queue: str,
        prefetch: int,
        on_deliveries: OnDeliveries,
        *,
        name: str,
        frame_max: int = 0,
    ) -> Intake:
        """Connect, log in, open a channel and consume ``queue`` with ``prefetch`` unsettled.

        ``frame_max`` lowers the broker's largest frame (0: the broker's). Raises OSError or
        TimeoutError when the broker cannot be reached, IntakeClosed when it refuses.
        """
        parts = urlsplit(url)
        tls = tls_context(parts)
        port = parts.port or (5671 if tls else 5672)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(HANDSHAKE_TIMEOUT):
            _, intake = await loop.create_connection(
                lambda: cls(on_deliveries), parts.hostname or "localhost", port, ssl=tls
            )
            try:
                await intake._handshake(
                    user=unquote(parts.username or "guest"),
                    password=unquote(parts.password or "guest"),
                    vhost=unquote(parts.path[1:]) or "/",
                    name=name,
                    frame_max=frame_max,
                )
                intake._send(commands.Basic.Qos(prefetch_count=prefetch))
                await intake._reply(commands.Basic.QosOk)
                intake._send(commands.Basic.Consume(queue=queue))
                ok = await intake._reply(commands.Basic.ConsumeOk)
            except BaseException:
                intake._abort(None)
                raise
        intake.consumer_tag = ok.consumer_tag
        return intake

    async def _handshake(
        self, *, user: str, password: str, vhost: str, name: str, frame_max: int
    ) -> None:
        assert self._transport is not None
        self._transport.write(header.ProtocolHeader().marshal())
        await self._reply(commands.Connection.Start)
        properties: dict[str, Any] = {
            "product": "queuegate",
            "connection_name": name,
            # Without it the broker drops a consumer of a deleted queue without telling us.
            "capabilities": {"consumer_cancel_notify": True},
        }
        self._send(
            commands.Connection.StartOk(
                client_properties=properties, response=f"\0{user}\0{password}"
            ),
            channel=0,
        )
        tune = await self._reply(commands.Connection.Tune)
        beat = min(tune.heartbeat, HEARTBEAT) if tune.heartbeat else HEARTBEAT
        largest = min(tune.frame_max, frame_max) if frame_max else tune.frame_max
        self._send(
            commands.Connection.TuneOk(
                channel_max=tune.channel_max, frame_max=largest, heartbeat=beat
            ),
            channel=0,
        )
        self._send(commands.Connection.Open(virtual_host=vhost), channel=0)
        await self._reply(commands.Connection.OpenOk)
        self._heartbeat = beat
        self._schedule_beat()
        self._send(commands.Channel.Open())
        await self._reply(commands.Channel.OpenOk)

    @property
    def is_open(self) -> bool:
        return not self.closed.done() and not self._closing

    def ack(self, tag: int, *, multiple: bool = False) -> None:
        self._send(commands.Basic.Ack(delivery_tag=tag, multiple=multiple))

    def reject(self, tag: int) -> None:
        """Reject without requeueing: the queue dead-letters it."""
        self._send(commands.Basic.Reject(delivery_tag=tag, requeue=False))

    async def cancel(self) -> None:
        """Stop the consumer; deliveries sent before the broker confirms still arrive."""
        if self.consumer_tag is None:
            return
        self._send(commands.Basic.Cancel(consumer_tag=self.consumer_tag))
        await self._wait(self._cancelled)

    async def close(self) -> None:
        """Close the connection; what is unsettled goes back to the queue."""
        if self.closed.done():
            self._abort(None)  # the socket may outlive the reason, never the close
            return
        if self._closing:
            await asyncio.shield(self.closed)
            return
        self._closing = True
        assert self._transport is not None
        self._transport.write(frame.marshal(commands.Connection.Close(200, "", 0, 0), 0))
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await asyncio.shield(self.closed)
        except TimeoutError:
            self._abort(None)

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without deriving from it.
        self._transport = cast(asyncio.Transport, transport)
        self._last_received = self._loop.time()

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(exc if exc is not None or self._closing else IntakeClosed("connection lost"))

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        self._last_received = self._loop.time()
        delivered: list[Delivery] = []
        position, size = 0, len(buffer)
        try:
            while size - position >= 8:
                kind, channel, length = _FRAME_HEAD.unpack_from(buffer, position)
                start, end = position + 7, position + 7 + length
                if end >= size:
                    break
                if buffer[end] != _FRAME_END:
                    raise IntakeClosed("malformed frame from the broker")
                if kind == _BODY:
                    self._body(buffer[start:end], delivered)
                elif kind == _HEADER:
                    self._header = bytes(buffer[start:end])
                    self._remaining = _U64.unpack_from(buffer, start + 4)[0]
                    if not self._remaining:
                        self._body(b"", delivered)
                elif kind == _METHOD and buffer[start : start + 4] == _DELIVER:
                    # Basic.Deliver: the consumer tag (a short string), then the delivery tag.
                    self._tag = _U64.unpack_from(buffer, start + 5 + buffer[start + 4])[0]
                elif kind != _HEARTBEAT:
                    _, _, decoded = frame.unmarshal(bytes(buffer[position : end + 1]))
                    self._control(channel, decoded)
                position = end + 1
        except Exception as exc:
            self._abort(exc if isinstance(exc, IntakeClosed) else IntakeClosed(repr(exc)))
            return
        finally:
            del buffer[:position]
        if delivered:
            self._on_deliveries(self, delivered)

    def _body(self, part: bytes | bytearray, delivered: list[Delivery]) -> None:
        self._remaining -= len(part)
        if self._remaining > 0:
            self._parts.append(bytes(part))
            return
        if self._parts:
            part = b"".join([*self._parts, part])
            self._parts = []
        delivered.append(Delivery(self._tag, bytes(part), self._header))

    def _control(self, channel: int, decoded: object) -> None:
        match decoded:
            case commands.Connection.Close():
                self._send(commands.Connection.CloseOk(), channel=0)
                self._finish(
                    IntakeClosed(f"the broker closed the connection: {decoded.reply_text}")
                )
                assert self._transport is not None
                self._transport.close()  # not abort: the Close-Ok is still to be sent
            case commands.Connection.CloseOk():
                self._abort(None)
            case commands.Channel.Close():
                self._send(commands.Channel.CloseOk())
                raise IntakeClosed(f"the broker closed the channel: {decoded.reply_text}")
            case commands.Basic.Cancel():
                raise IntakeClosed("the broker cancelled the consumer (was its queue deleted?)")
            case commands.Basic.CancelOk():
                if not self._cancelled.done():
                    self._cancelled.set_result(None)
            case Frame() if channel in (0, CHANNEL):
                self._replies.put_nowait(decoded)
            case _:
                raise IntakeClosed(f"unexpected frame from the broker: {decoded!r}")

    # Internals

    def _send(self, method: Frame | ContentBody, *, channel: int = CHANNEL) -> None:
        if self.closed.done() or self._transport is None:
            raise IntakeClosed("the connection is closed")
        self._transport.write(frame.marshal(method, channel))

    async def _reply(self, kind: type[F]) -> F:
        reply = await self._wait(asyncio.ensure_future(self._replies.get()))
        if not isinstance(reply, kind):
            raise IntakeClosed(f"expected {kind.__name__} from the broker, got {reply!r}")
        return reply

    async def _wait(self, future: asyncio.Future[T]) -> T:
        """``future``'s result, or IntakeClosed as soon as the connection ends."""
        done, _ = await asyncio.wait((future, self.closed), return_when=asyncio.FIRST_COMPLETED)
        if future in done:
            return future.result()
        future.cancel()
        raise IntakeClosed(f"the connection closed: {self.closed.result()!r}")

    def _schedule_beat(self) -> None:
        self._beat = self._loop.call_later(self._heartbeat / 2, self._on_beat)

    def _on_beat(self) -> None:
        if self.closed.done():
            return
        if self._loop.time() - self._last_received > 2 * self._heartbeat:
            self._abort(IntakeClosed(f"no frame from the broker in {2 * self._heartbeat} s"))
            return
        assert self._transport is not None
        self._transport.write(heartbeat.Heartbeat().marshal())
        self._schedule_beat()

    def _abort(self, reason: BaseException | None) -> None:
        self._finish(reason)
        if self._transport is not None:
            self._transport.abort()

    def _finish(self, reason: BaseException | None) -> None:
        if self._beat is not None:
            self._beat.cancel()
        if not self.closed.done():
            self.closed.set_result(reason)
