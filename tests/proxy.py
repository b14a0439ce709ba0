"""A TCP proxy that tests put in front of a real service to cut it off on purpose.

Outage tests never stop the shared RabbitMQ, Redis or PostgreSQL (other tests use them):
they point the component under test at a proxy and take the proxy down instead::

    async with TcpProxy(settings.redis_url) as proxy:
        s = settings.model_copy(update={"redis_url": proxy.url})
        ...
        await proxy.down()   # every open connection is cut; new ones are refused
        await proxy.up()     # the service is back
        proxy.lose_reply(b"EVALSHA")  # the next such request runs; its reply never comes

``hang()`` freezes the service as SIGSTOP would: connections stay open and new ones are taken,
but nothing passes either way until ``up()``; what was sent meanwhile then arrives.
``hang_requests()`` and ``hang_replies()`` hold one way alone (a service too busy to read,
answers late on a slow network); ``replies_waiting`` is set once an answer is held, and
``release_replies()`` lets the answers through alone.
``hang_at(marker)`` hangs it once a client sends ``marker``, before those bytes pass: a
request that never reaches the service (until ``up()``), its client waiting for the answer.

``hold_replies_after(marker)`` keeps the connections open but stops passing the service's
bytes back once a client has sent ``marker``: what it sent arrives, no answer to it does
(until ``up()``).

``watch(marker)`` counts the times ``marker`` passes, either way, in ``seen``: what a client
asked of the service, or was told, named it.

``TcpProxy(url, listen="::1")`` listens on the IPv6 loopback instead: the service reached at
an IPv6 address. ``TcpProxy(url, receive_buffer=n)`` takes at most about ``n`` bytes of a client
it does not read (its sockets' receive buffer, which the kernel otherwise grows to tens of MiB):
a client's writes then back up into the client itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit, urlunsplit

CHUNK = 65536


class TcpProxy:
    def __init__(
        self, target_url: str, *, listen: str = "127.0.0.1", receive_buffer: int | None = None
    ) -> None:
        parts = urlsplit(target_url)
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"{target_url!r} needs an explicit host and port")
        self._target_url = target_url
        self._listen = listen
        self._receive_buffer = receive_buffer
        self._target = (parts.hostname, parts.port)
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._up = True
        self._requests_flowing = asyncio.Event()
        self._requests_flowing.set()
        self._replies_flowing = asyncio.Event()
        self._replies_flowing.set()
        self.replies_waiting = asyncio.Event()
        """Set once the service's bytes wait behind ``hang_replies`` (or ``hang``)."""
        self._lose_reply_to: bytes | None = None
        self.replies_lost = 0
        self.requested = 0
        """Bytes clients sent through to the service, on every connection."""
        self._marker: bytes | None = None
        self._watched: bytes | None = None
        self.seen = 0
        """Times the watched marker passed (``watch``)."""
        self.held = asyncio.Event()
        """Set once a client sent the marker: the service's bytes are dropped from then on."""
        self._hang_at: bytes | None = None
        self._alone = False
        self._hung_alone: list[asyncio.Event] = []
        """The flow of each connection hung alone (``hang_at(..., alone=True)``)."""
        self.hung = asyncio.Event()
        """Set once a client sent the ``hang_at`` marker: nothing passes from then on."""
        self.port = 0

    @property
    def url(self) -> str:
        """The target URL with the proxy's address and port in place of the service's."""
        parts = urlsplit(self._target_url)
        host = parts.netloc.rsplit("@", 1)
        address = f"[{self._listen}]" if ":" in self._listen else self._listen
        netloc = f"{address}:{self.port}"
        if len(host) == 2:
            netloc = f"{host[0]}@{netloc}"
        return urlunsplit(parts._replace(netloc=netloc))

    async def __aenter__(self) -> Self:
        family = socket.AF_INET6 if ":" in self._listen else socket.AF_INET
        listening = socket.socket(family, socket.SOCK_STREAM)
        if self._receive_buffer is not None:
            # Before listen(): the connections accepted inherit it, their window sized by it.
            listening.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._receive_buffer)
        listening.bind((self._listen, 0))
        self._server = await asyncio.start_server(self._accept, sock=listening)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.down()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def down(self) -> None:
        """Cut every open connection and refuse new ones, as a stopped service would."""
        self._up = False
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._pipes):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._pipes, return_exceptions=True)

    async def up(self) -> None:
        """The service is back, answering again (a hold set by ``hold_replies_after`` or
        ``hang_at`` ends)."""
        self._up = True
        self._requests_flowing.set()
        self._replies_flowing.set()
        self.replies_waiting.clear()
        self._marker = self._hang_at = None
        for flowing in self._hung_alone:
            flowing.set()
        self._hung_alone = []
        self.held.clear()
        self.hung.clear()

    def hang(self) -> None:
        """Pass nothing either way, keeping every connection open, until ``up()``: a frozen
        service, which neither answers nor refuses."""
        self.hang_requests()
        self.hang_replies()

    def hang_requests(self) -> None:
        """Pass no client's bytes to the service until ``up()`` (they are kept, and the
        clients' sockets fill), its answers still coming."""
        self._requests_flowing.clear()

    def hang_replies(self) -> None:
        """Pass none of the service's bytes to a client until ``up()`` or ``release_replies()``
        (they are kept), the clients' requests still reaching it."""
        self._replies_flowing.clear()

    def release_replies(self) -> None:
        """Let the service's bytes through again, what was held first (a hang of the requests
        stays)."""
        self._replies_flowing.set()
        self.replies_waiting.clear()

    def lose_reply(self, marker: bytes) -> None:
        """Let the next request holding ``marker`` reach the service, then cut its connection
        before the reply comes back: the client cannot tell whether it ran."""
        self._lose_reply_to = marker

    def hold_replies_after(self, marker: bytes) -> None:
        """Once any client sends ``marker``, nothing the service sends reaches a client."""
        self._marker = marker

    def hang_at(self, marker: bytes, *, alone: bool = False) -> None:
        """``hang()`` once any client sends ``marker``, before those bytes reach the service;
        ``alone``: only the connection that sent it hangs (both ways, kept open), the others
        flowing on."""
        self._hang_at, self._alone = marker, alone

    def watch(self, marker: bytes) -> None:
        """Count in ``seen``, from now on, the times ``marker`` passes either way."""
        self._watched, self.seen = marker, 0

    def _count(self, tail: bytes, data: bytes) -> bytes:
        """Count the watched marker in ``data``, with the ``tail`` of the read before (a
        marker may span two reads); the tail to give the next read."""
        if self._watched is None:
            return b""
        joined = tail + data
        self.seen += joined.count(self._watched)
        # Too short to hold a whole marker, so none is counted twice.
        return joined[max(0, len(joined) - len(self._watched) + 1) :]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._up:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        if self._cut():
            # Taken down while this one was connecting: it must not outlive the cut.
            for w in (writer, up_writer):
                w.transport.abort()
            return
        self._writers.update((writer, up_writer))
        sent = asyncio.Event()  # the request whose reply is to be lost went up
        flowing = asyncio.Event()  # this connection's own (hang_at alone)
        flowing.set()
        pipes = [
            asyncio.create_task(self._requests(reader, up_writer, sent, flowing)),
            asyncio.create_task(self._replies(up_reader, writer, sent, flowing)),
        ]
        self._pipes.update(pipes)
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pipes:
                task.cancel()
                self._pipes.discard(task)
            for w in (writer, up_writer):
                w.transport.abort()
                self._writers.discard(w)

    def _cut(self) -> bool:
        """Whether the service is down now (read afresh after an await)."""
        return not self._up

    async def _requests(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        sent: asyncio.Event,
        flowing: asyncio.Event,
    ) -> None:
        tail, hang_tail, watched = b"", b"", b""
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(CHUNK):
                watched = self._count(watched, data)
                if self._lose_reply_to is not None and self._lose_reply_to in data:
                    self._lose_reply_to = None
                    sent.set()
                if self._marker is not None and not self.held.is_set():
                    # With the last bytes before: a marker may span two reads.
                    if self._marker in tail + data:
                        self.held.set()
                    tail = data[-len(self._marker) :]
                if self._hang_at is not None:
                    if self._hang_at in hang_tail + data:
                        self._hang_at = None
                        if self._alone:
                            flowing.clear()
                            self._hung_alone.append(flowing)
                        else:
                            self.hang()
                        self.hung.set()
                    else:
                        hang_tail = data[-len(self._hang_at) :]
                await self._requests_flowing.wait()
                await flowing.wait()
                self.requested += len(data)
                writer.write(data)
                await writer.drain()

    async def _replies(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        sent: asyncio.Event,
        flowing: asyncio.Event,
    ) -> None:
        watched = b""
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(CHUNK):
                watched = self._count(watched, data)
                if sent.is_set():
                    self.replies_lost += 1
                    return  # the connection is cut with the reply unsent
                if self.held.is_set():
                    continue  # held: the service's bytes are dropped, the connection kept
                if not self._replies_flowing.is_set():
                    self.replies_waiting.set()
                    await self._replies_flowing.wait()
                await flowing.wait()
                writer.write(data)
                await writer.drain()


__all__ = ["TcpProxy"]
