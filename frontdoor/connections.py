"""What one HTTP connection may cost the front door before any route runs.

uvicorn parses HTTP/1.1 with httptools here (its fast parser, the one ``auto`` picks), and by
itself bounds none of these:

- the request line and headers: httptools buffers a header however long it grows
  (``h11_max_incomplete_event_size`` bounds only the h11 parser, several times slower);
- the time a connection takes to send them: uvicorn's one timer, ``timeout_keep_alive``, is
  armed after a response, so a connection that opens and sends nothing, or half a header,
  stays open for good (uvicorn has no header timeout);
- the connections held at once: ``limit_concurrency`` is checked once a request's headers
  are complete, so it answers requests 503 but never closes the connections that send no
  complete headers, and those exhaust the process's file descriptors.

``GuardedHttpToolsProtocol`` adds the three to uvicorn's httptools protocol, at its parser
callbacks, and answers in OpenAI's error shape with ``connection: close``:

- a request line and headers over ``max_header_bytes``: 431;
- headers not complete ``header_timeout`` seconds after the connection opened or its
  request began: 408 (a connection that sent nothing is closed without a word);
- past ``max_connections``, a connection is closed to make room: the oldest whose request
  running is to be refused for its key's or team's share (``Held.refuses``), else the
  oldest that presented a key refused (none, unknown, revoked, too many wrong keys from its
  address: ``Held.unproven``) and was served none since, running a request or not, else
  the one idle longest (no request of it running) that was never served (no request sent,
  or every one refused) or whose answer is not read, else the one idle longest. A
  connection made less than ``FRESH`` ago that has sent nothing yet is not closed: when
  every one is busy or so new, the new one is answered 503. So a flood of idle or slow
  connections holds no one else's place, nor does a team holding its share of requests
  and keeping more pipelined on any number of connections (each always has one running),
  nor a client pipelining or reconnecting with wrong keys, a reconnect flood closes no
  caller's new connection before its headers are read, and a caller already served keeps
  its connection while such floods come and go;
- a request whose answer the client does not read (the write buffer full) for
  ``WRITE_STALL`` seconds is cut off (``write_stalled``), and meanwhile counts as idle: the
  first closed when the process is full, so unread answers hold no one else's place;
- a client pipelining more than ``MAX_PIPELINED`` requests ahead of their answers is cut
  off (``pipelined``): uvicorn would parse and queue every request it has read;
- a request answered before its body ended (401, 408, 413, 429) has the rest of its body
  read and dropped for ``LINGER`` seconds at most, so that the client, still sending, reads
  its answer; then the connection closes (uvicorn would keep it open with no timer at all).

A connection that goes away while its requests run has them all told so, the one running and
those pipelined behind it: uvicorn tells only the last one read, and the one running would
write to the closed transport and log a traceback, one per connection any client closes.
The one running is cut once the server stops (``stop``), not given the grace: nobody reads
its answer.

    limits = ConnectionLimits.of(settings)
    config = uvicorn.Config(app, http=guarded_protocol(limits, app.state.held), ...)
"""

from __future__ import annotations

import asyncio
import functools
import logging
import resource
import uuid
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from frontdoor.errors import ApiError
from frontdoor.held import ON_REFUSED, ON_UNPROVEN, SCOPE_KEY, Held, Hold
from queuegate.api_errors import openai_error
from queuegate.metrics import observe_connection_closed
from queuegate.settings import Settings

log = logging.getLogger(__name__)

LINGER = 30.0
"""Seconds the rest of a body answered early is read and dropped at most (nginx's
``lingering_time``): a client that is still sending reads its answer only once it is done.
Such a connection counts as idle, the first to go when the process holds too many."""
WRITE_STALL = 30.0
"""Seconds an answer may wait for its client to read any of it before the connection is cut."""
FRESH = 1.0
"""Seconds a new connection that has sent nothing yet is not closed to make room: a client
sends its headers as soon as it connects, so a reconnect flood would otherwise close each
new connection, a well-behaved client's too, before they arrive. A newcomer that finds only
such connections (or busy ones) is answered 503 instead."""
MAX_PIPELINED = 8
"""Requests a connection may send ahead of their answers; browsers and SDKs send none."""
OPEN_FILES_RESERVE = 256
"""File descriptors a front-door process keeps for more than client connections: its broker,
Redis and PostgreSQL connections, batch files, logs."""
TASK_KEY = "queuegate.task"
"""Where a request's ASGI scope holds the task serving it."""


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int
    max_header_bytes: int
    header_timeout: float

    @classmethod
    def of(cls, settings: Settings) -> ConnectionLimits:
        return cls(
            max_connections=settings.http_max_connections,
            max_header_bytes=settings.http_max_header_bytes,
            header_timeout=settings.http_header_timeout,
        )


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header size limit, a header timeout and a cap on
    connections; one subclass per server (``guarded_protocol``) holds its limits."""

    limits: ClassVar[ConnectionLimits]
    idle: ClassVar[dict[GuardedHttpToolsProtocol, None]]
    """The server's connections with no request running, longest idle first."""
    strangers: ClassVar[dict[GuardedHttpToolsProtocol, None]]
    """The idle connections no request of which was served yet (each refused, or none sent),
    and those whose answer is not read, longest idle first: closed to make room before the
    others idle, kept open by callers already served."""
    held: ClassVar[Held]
    refused: ClassVar[dict[GuardedHttpToolsProtocol, None]]
    """The server's connections whose request running is refused for its share (foreseen by
    ``Held.refuses`` as it starts, or told through ``ON_REFUSED``): the first closed to make
    room, so that a team keeping refused requests pipelined holds no place."""
    fresh: ClassVar[dict[GuardedHttpToolsProtocol, None]]
    """The server's connections made less than ``FRESH`` ago that sent nothing yet, oldest
    first: not closed to make room (the ones older are moved to ``strangers`` then)."""
    unproven: ClassVar[dict[GuardedHttpToolsProtocol, None]]
    """The server's connections that presented a key refused (``ON_UNPROVEN``), none of
    whose requests was served since, in the order of their first: closed to make room next,
    busy or idle, so that wrong keys, pipelined or sent again and again, hold no place."""
    abandoned: ClassVar[dict[asyncio.Task[None], None]]
    """The tasks of the server's requests still running whose client went away before their
    answer ended (a chat waiting for its job, a stream for its first chunk: neither hears
    of it): cut once the server stops (``stop``)."""
    stopping: ClassVar[bool]
    """The server stops: a request whose client goes away is cut at once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reading_head = True
        self._head_bytes = 0
        self._clock: asyncio.TimerHandle | None = None
        self._stall: asyncio.TimerHandle | None = None
        self._tail = b""
        """The last bytes read, for a head's end split between two reads."""
        self._began = False
        """Whether a request began in the read being parsed."""
        self._completed = False
        """Whether a request ended in the read being parsed."""
        self._running: RequestResponseCycle | None = None
        self._served = False
        """Whether a request of this connection was held and served (neither refused for a
        share nor for its key)."""
        self._opened = 0.0
        """When the connection was made (the loop's clock), for ``FRESH``."""

    def connection_made(  # type: ignore[override]
        self, transport: asyncio.Transport
    ) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections and not self._make_room():
            self._refuse(
                ApiError(
                    "service_unavailable",
                    "this front-door process holds as many connections as it may: retry shortly",
                ),
                "full",
            )
            # Gone as of now, as a connection closed to make room is: uvicorn forgets it only
            # on the next turn of the loop, and each newcomer of a burst counted meanwhile
            # would close one more connection, or be refused, for room it does not take.
            self.connections.discard(self)
            return
        self._opened = self.loop.time()
        self.fresh[self] = None
        self._time(self.limits.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        running = self._running
        if running is not None and not running.response_complete:
            task: asyncio.Task[None] | None = running.scope.get(TASK_KEY)  # type: ignore[assignment]
            if task is not None:
                self._abandon(task)
        self._untime()
        self._unstall()
        self._unrest()
        self._unrefuse()
        self._forget_requests()
        super().connection_lost(exc)

    def _forget_requests(self) -> None:
        """Tell the request running and those pipelined that their client is gone, so that
        none writes to the transport once it is closed (uvloop raises then)."""
        gone = [cycle for cycle, _ in self.pipeline]
        self.pipeline.clear()
        if self._running is not None:
            gone.append(self._running)
        for cycle in gone:
            if not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        self._running = cycle
        self.refused.pop(self, None)
        scope = cast(Scope, cycle.scope)
        # Marked now if its share is full already, else once it is refused (other requests
        # started with it may fill the share before it is admitted).
        scope[ON_REFUSED] = self._refusing
        scope[ON_UNPROVEN] = self._unproven
        if self.held.refuses(scope):
            self._refusing()
        super()._start_asgi_task(cycle, functools.partial(self._run, app, cycle))

    async def _run(
        self, app: ASGIApp, cycle: RequestResponseCycle, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """``app`` serving a request, its task noted in its scope so that the request can
        be cut should its client go away while the server stops."""
        task = asyncio.current_task()
        assert task is not None
        scope[TASK_KEY] = task
        if cycle.disconnected:  # gone before it started
            self._abandon(task)
        try:
            await app(scope, receive, send)
        except asyncio.CancelledError:
            if not cycle.disconnected:
                raise
            # Cut with nobody to answer (``stop``, or the grace's end): not the app's
            # failure, which uvicorn would log with its traceback.

    @classmethod
    def _abandon(cls, task: asyncio.Task[None]) -> None:
        if task.done() or task in cls.abandoned:
            return
        cls.abandoned[task] = None
        task.add_done_callback(cls.abandoned.pop)
        if cls.stopping:
            task.cancel()

    @classmethod
    def stop(cls) -> None:
        """The server stops: cut the requests whose client has gone, and from now on each
        request as its client goes. uvicorn would give them the grace, as any request
        running, and a process with none left to answer would wait for their jobs (a chat
        it holds ends as its job does: 3.6 s measured for a job of 4 s, and up to the
        whole grace, 30 s by default)."""
        cls.stopping = True
        for task in list(cls.abandoned):
            task.cancel()

    def _refusing(self) -> None:
        if not self.transport.is_closing():
            self.refused[self] = None

    def _unproven(self) -> None:
        if not self.transport.is_closing():
            self.unproven.setdefault(self)

    def _unrefuse(self) -> None:
        self.refused.pop(self, None)
        self.unproven.pop(self, None)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall is None:
            self._stall = self.loop.call_later(WRITE_STALL, self._cut, "write_stalled")
        self._rest()
        self.strangers[self] = None

    def resume_writing(self) -> None:
        super().resume_writing()
        self._unstall()
        if self.cycle is not None and not self.cycle.response_complete:
            self._unrest()

    def _unstall(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def _cut(self, reason: str) -> None:
        """Drop the connection now, whatever is left unwritten (``close`` would wait for the
        client to read it)."""
        self._stall = None
        self._untime()
        self._unrest()
        self._unrefuse()
        if not self.transport.is_closing() or self.flow.write_paused:
            observe_connection_closed(reason)
            self._forget_requests()
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self in self.fresh:  # its first bytes: idle as any other until its head is whole
            self._rest()
        if self._reading_head and not self.transport.is_closing():
            # Counted before parsing too: httptools reads a head whole from one read,
            # however long, so one read could carry a head far over the limit.
            end = (self._tail + data).find(b"\r\n\r\n")
            head = len(data) if end < 0 else max(0, end + 4 - len(self._tail))
            if self._head_bytes + head > self.limits.max_header_bytes:
                self._refuse_head()
                return
        self._tail = data[-3:]
        self._began = self._completed = False
        super().data_received(data)
        # A head still incomplete: counted after parsing too, for the next read's check.
        if self._reading_head and not self.transport.is_closing():
            if self._completed:
                # A request ended in this read, at an offset httptools does not say: what
                # follows it (the next head's first bytes, if any) counts from the next read.
                self._head_bytes = 0
            elif self._began:  # begun in this read, its head unfinished: what follows the
                # last head's end (a body would have ended first)
                last = data.rfind(b"\r\n\r\n")
                self._head_bytes = len(data) - (last + 4 if last >= 0 else 0)
            else:
                self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_bytes:
                self._refuse_head()

    def _refuse_head(self) -> None:
        self._refuse(
            ApiError(
                "headers_too_large",
                f"the request line and headers are over "
                f"{self.limits.max_header_bytes} bytes: send less",
            ),
            "header_bytes",
        )

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading_head = True
        self._began = True
        self._head_bytes = 0
        if self._clock is None:
            self._time(self.limits.header_timeout)

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._untime()
        if not self.flow.write_paused:
            self._unrest()
        super().on_headers_complete()
        if len(self.pipeline) > MAX_PIPELINED:
            self._cut("pipelined")

    def on_message_complete(self) -> None:
        super().on_message_complete()
        # What comes next on the wire is the next request's head.
        self._completed = True
        self._reading_head = True
        self._head_bytes = 0
        self._tail = b""
        if self.cycle.response_complete and not self.transport.is_closing():
            # The rest of a body answered early is read: the connection may serve again,
            # and waits for its next request as any other does.
            self._untime()
            self._unset_keepalive_if_required()
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def on_response_complete(self) -> None:
        self.refused.pop(self, None)
        hold: Hold | None = self.cycle.scope.get(SCOPE_KEY)  # type: ignore[assignment]
        if hold is not None and not hold.refused and not hold.unproven:
            self._served = True
            self.unproven.pop(self, None)
        pipelined = bool(self.pipeline)
        super().on_response_complete()
        if self.transport.is_closing():
            if not self.transport.get_write_buffer_size():
                # Closed after its answer (``connection: close``, a 429 of a full share, say),
                # all of it written: gone as of now, not on the next turn of the loop, so
                # that a client reconnecting at once never finds its old place still held.
                self.connections.discard(self)
            return
        if pipelined:
            return
        self._rest()
        if self.cycle.more_body:
            # Answered before its body ended: the rest is read and dropped, not for ever.
            self._time(LINGER)

    def _time(self, seconds: float) -> None:
        self._untime()
        self._clock = self.loop.call_later(seconds, self._time_out)

    def _untime(self) -> None:
        if self._clock is not None:
            self._clock.cancel()
            self._clock = None

    def _time_out(self) -> None:
        self._clock = None
        if self.transport.is_closing():
            return
        if not self._reading_head:  # the rest of a body answered early: long enough
            self.transport.close()
        elif self._head_bytes:
            seconds = self.limits.header_timeout
            why = f"the request headers did not arrive within {seconds:g} s"
            self._refuse(ApiError("request_timeout", why), "header_timeout")
        else:
            observe_connection_closed("header_timeout")
            self.transport.close()

    def _rest(self) -> None:
        self._unrest()
        self.idle[self] = None
        if not self._served:
            self.strangers[self] = None

    def _unrest(self) -> None:
        self.fresh.pop(self, None)
        self.idle.pop(self, None)
        self.strangers.pop(self, None)

    def _make_room(self) -> bool:
        """Close the oldest connection whose request is refused, else the oldest that
        presented a key refused, else the one idle longest that was never served, else the
        one idle longest; False when there is none. A connection made less than ``FRESH``
        ago that has sent nothing yet is none of these: closing it would close every
        client's new connection before its headers arrive, a well-behaved one's too, while a
        flood of connections comes and goes."""
        deadline = self.loop.time() - FRESH
        while self.fresh and next(iter(self.fresh))._opened <= deadline:
            next(iter(self.fresh))._rest()  # silent for long enough: a stranger
        victim = next(iter(self.refused), None)
        if victim is None:
            victim = next(iter(self.unproven), None)
        if victim is None:
            victim = next(iter(self.strangers), None)
        if victim is None:
            victim = next(iter(self.idle), None)
        if victim is None:
            return False
        victim._unrest()
        victim._unrefuse()
        victim._untime()
        # Its request refused, if any, is told its client is gone: it writes nothing more.
        victim._forget_requests()
        if victim.flow.write_paused:  # an answer its client does not read: close would wait
            victim.transport.abort()
        else:
            victim.transport.close()
        observe_connection_closed("evicted")
        # It is gone as of now (uvicorn forgets it only on the next turn of the loop).
        self.connections.discard(victim)
        return True

    def _refuse(self, error: ApiError, reason: str) -> None:
        observe_connection_closed(reason)
        self._reading_head = False
        self._untime()
        self._unrest()
        if self.cycle is None or self.cycle.response_complete:  # nothing else on the wire
            self.transport.write(_answer(error))
        self._forget_requests()
        self.transport.close()


def guarded_protocol(limits: ConnectionLimits, held: Held) -> type[GuardedHttpToolsProtocol]:
    """The protocol class of one server: its limits, the requests its app holds, and its own
    idle, refused and unproven connections."""

    class ServerProtocol(GuardedHttpToolsProtocol):
        pass

    ServerProtocol.limits = limits
    ServerProtocol.idle = {}
    ServerProtocol.held = held
    ServerProtocol.refused = {}
    ServerProtocol.unproven = {}
    ServerProtocol.fresh = {}
    ServerProtocol.strangers = {}
    ServerProtocol.abandoned = {}
    ServerProtocol.stopping = False
    return ServerProtocol


def fit_open_files(max_connections: int) -> int:
    """The connections this process can hold: its open-file limit is raised to
    ``max_connections`` plus ``OPEN_FILES_RESERVE`` where the hard limit allows; where it
    does not, fewer (and a warning), so that a flood of connections never takes the
    descriptors the process needs for its own."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + OPEN_FILES_RESERVE
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return max_connections
    raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
        soft = raised
    except (ValueError, OSError):
        pass
    if soft >= wanted:
        return max_connections
    fitted = max(1, soft - OPEN_FILES_RESERVE)
    log.warning(
        "QUEUEGATE_HTTP_MAX_CONNECTIONS is %d but this process may open %d files: it holds "
        "%d connections at most; raise its open-file limit (ulimit -n) for more",
        max_connections,
        soft,
        fitted,
    )
    return fitted


def _answer(error: ApiError) -> bytes:
    body = orjson.dumps(openai_error(error.code, error.message, error.param))
    headers = {
        "content-type": "application/json",
        "content-length": str(len(body)),
        "connection": "close",
        "x-request-id": uuid.uuid4().hex,
        **error.headers(),
    }
    head = b"".join(f"{name}: {value}\r\n".encode() for name, value in headers.items())
    return STATUS_LINE[error.status] + head + b"\r\n" + body


__all__ = [
    "ConnectionLimits",
    "GuardedHttpToolsProtocol",
    "fit_open_files",
    "guarded_protocol",
]
