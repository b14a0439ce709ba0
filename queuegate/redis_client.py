"""The one way a process makes its Redis client: a bounded pool that waits rather than fails,
on the Redis of ``redis_url``, or on the primary that Redis Sentinel names.

Every client of the gateway's own processes comes from ``redis_for`` (tests/test_layout.py
holds the packages to it), so a deployment on Sentinel follows a failover everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection, SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    RedisError,
)

from queuegate.urls import UrlRefused, redact_url

if TYPE_CHECKING:  # the settings check their Redis URL with redis_connection
    from queuegate.settings import Settings

CONNECTIONS = 50
"""Connections one client keeps: Redis answers each command in well under a millisecond, so
more would only add sockets, not throughput."""
RETRIES = 3
"""Times a command is sent again on a fresh connection after its connection failed or its
reply did not come within ``Settings.redis_timeout``: a restarted Redis leaves every pooled
connection closed, and without a retry each one's next command would fail once, as if Redis
were still down (jobs then served unclaimed); a connection whose Redis vanished without a
word (a partition, a host that died) is left for a fresh one. Under Sentinel the fresh
connection asks the Sentinels where the primary is now. A Redis that hangs thus fails a
command after ``(RETRIES + 1) * redis_timeout`` seconds and the backoff: so long, too, a
command waits for a free connection (``command_bound``).

A command sent again may have run already (its connection broke after Redis ran it, before
the reply came back; a hung Redis runs every copy it was sent once it resumes): every script
that would count something twice if run twice is made to run once per call
(``workers/admission/lua/batch.lua``, ``workers/lua/finish.lua``)."""

BACKOFF_CAP = 0.2
"""Most seconds between two tries of a command."""

FOLLOW = 1.0
"""Seconds between a client's questions to the Sentinels about where the primary is, while it
hands out connections. redis-py asks only when a connection is made: after a failover that
left the old primary running (``SENTINEL FAILOVER``, a partition), a pooled connection would
go on writing to it, and the Sentinels demote it seconds later, dropping what it took since."""


class _OnePassPacking:
    """A connection that packs a command in one call of hiredis's C packer, which encodes
    str (UTF-8), int, float and bytes itself, as redis-py's Encoder would.

    redis-py's own packer (hiredis installed) first runs its Encoder on every argument in
    Python, a generator step and an ``encode`` call each: a governed job's scripts send about
    130 arguments, whose packing was the largest part of what its admission cost the worker
    (an EVALSHA of 44 arguments 69-87 µs, in one pass 11). Anything else (a first argument of
    several words, such as "SCRIPT LOAD"; another encoding; a value hiredis refuses, such as
    a bool, which redis-py rejects with its own error) goes redis-py's way."""

    encoder: Any

    def pack_command(self, *args: Any) -> list[bytes]:
        first, encoder = args[0], self.encoder
        if (
            type(first) is str
            and " " not in first
            and encoder.encoding == "utf-8"
            and encoder.encoding_errors == "strict"
        ):
            try:
                return [hiredis.pack_command(args)]
            except TypeError:
                pass  # redis-py raises its DataError, or packs what hiredis does not
        packed: list[bytes] = super().pack_command(*args)  # type: ignore[misc]
        return packed


class _QuickSend:
    """A connection that writes a command which cannot wait for its socket straight to it.

    redis-py writes every command under ``asyncio.wait_for`` (its ``socket_timeout``), which
    on Python 3.11 wraps the write in a task of its own, run in the loop's next turn: about
    20 µs of CPU a command, twice a job one at a time (its claim and its outcome's store). A
    write waits only while the transport holds more than its high-water mark unsent: with
    nothing unsent and a command no longer than that mark, it cannot, and there is nothing to
    time out. A connection that breaks under the write is found by the reply's read, under
    its timeout, a ConnectionError there as here. Anything else (a longer command, bytes
    still unsent, a connection to open or to check first) goes redis-py's way."""

    _writer: asyncio.StreamWriter | None
    health_check_interval: float

    def _writes_at_once(self, command: Any) -> bool:
        writer = self._writer
        if writer is None or self.health_check_interval or type(command) is not list:
            return False
        transport = writer.transport
        return (
            not transport.is_closing()
            and not transport.get_write_buffer_size()
            and sum(map(len, command)) <= transport.get_write_buffer_limits()[1]
        )

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if self._writes_at_once(command):
            assert self._writer is not None
            self._writer.writelines(command)
            return
        await super().send_packed_command(command, check_health)  # type: ignore[misc]


class _OnePassPool:
    """A pool whose connections, of the class the URL or Sentinel chose (TCP, TLS, a Unix
    socket), pack commands in one pass (``_OnePassPacking``) and write those that cannot wait
    without a task of their own (``_QuickSend``)."""

    connection_class: type[AbstractConnection]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        chosen = self.connection_class
        self.connection_class = type(
            f"OnePass{chosen.__name__}", (_OnePassPacking, _QuickSend, chosen), {}
        )


class _QuickHandout:
    """A waiting pool (``BlockingConnectionPool``) that hands out a free connection, and takes
    one back, without its waiting machinery while no command waits for one.

    redis-py 8 takes its condition, a timeout and its lock for each connection handed out,
    and records four state changes for its OpenTelemetry metrics (which no queuegate process
    turns on) and a release event for streaming credentials (which none uses): 13-15 µs of a
    command's 28-34 µs of CPU here, twice a job one at a time (its claim and its outcome's
    store). A connection is still checked as redis-py checks it (``ensure_connection``:
    connected, nothing unread), and a release that must do more (the connection to be
    reconnected, an AUTH to send) or that a waiting command must hear of goes redis-py's
    way; so does any handout while commands wait, so that none is overtaken for long."""

    _available_connections: list[AbstractConnection]
    _in_use_connections: set[AbstractConnection]
    _condition: asyncio.Condition
    _lock: asyncio.Lock

    def _quiet(self) -> bool:
        # Nobody waits for a connection, nor holds the pool (re-authentication, maintenance).
        return not self._condition._waiters and not self._lock.locked()

    async def get_connection(self, *args: Any, **kwargs: Any) -> AbstractConnection:
        available = self._available_connections
        if args or kwargs or not available or not self._quiet():
            connection: AbstractConnection = await super().get_connection(*args, **kwargs)  # type: ignore[misc]
            return connection
        connection = available.pop()
        self._in_use_connections.add(connection)
        try:
            await self.ensure_connection(connection)  # type: ignore[attr-defined]
        except BaseException:
            await self.release(connection)
            raise
        return connection

    async def release(self, connection: AbstractConnection) -> None:
        if (
            connection.should_reconnect()  # type: ignore[no-untyped-call]
            or connection._re_auth_token is not None
            or not self._quiet()
        ):
            await super().release(connection)  # type: ignore[misc]
            return
        self._in_use_connections.remove(connection)
        self._available_connections.append(connection)


class _WaitingPool(_OnePassPool, _QuickHandout, aioredis.BlockingConnectionPool):
    """redis-py's pool that waits for a free connection, packing commands in one pass."""


class _WaitingSentinelPool(
    _OnePassPool, _QuickHandout, SentinelConnectionPool, aioredis.BlockingConnectionPool
):
    """Sentinel's pool (connections go to the primary Sentinel names now), waiting for a free
    connection as ``BlockingConnectionPool`` does instead of failing past its size, and
    following a failover within ``FOLLOW`` seconds even while no connection fails."""

    _next_look = 0.0

    async def ensure_connection(self, connection: AbstractConnection) -> None:
        now = time.monotonic()
        if now >= self._next_look:
            self._next_look = now + FOLLOW
            # Disconnects the idle connections to a primary the Sentinels no longer name; no
            # answer: the command finds out for itself, as before.
            with contextlib.suppress(RedisError, OSError):
                await self.get_master_address()  # type: ignore[no-untyped-call]
        named = self.master_address
        where = (getattr(connection, "host", None), getattr(connection, "port", None))
        if named is not None and connection.is_connected and where != named:
            await connection.disconnect()  # connects again, to the primary named now
        await super().ensure_connection(connection)

    async def aclose(self) -> None:
        """Close the connections to the primary, then those to the Sentinels (redis-py
        leaves them to whoever made the Sentinel: here, the client's pool)."""
        await super().aclose()
        await self.sentinel_manager.aclose()


def command_bound(settings: Settings) -> float:
    """Seconds a command may take before it fails as Redis being unavailable: every try and the
    backoff between them. A command waiting for one of the ``CONNECTIONS`` waits as long: the
    connections may all be busy with a burst of slow but answered commands (a worker taking 5,000
    jobs at once waited over 5 s for one), and failing then would serve the jobs as in an outage,
    unclaimed."""
    return (RETRIES + 1) * (settings.redis_timeout + BACKOFF_CAP)


def redis_for(settings: Settings, *, connect_timeout: float | None = None) -> aioredis.Redis:
    """The Redis client of ``settings``: commands wait for one of ``CONNECTIONS`` connections
    (redis-py's default pool raises MaxConnectionsError past 100 commands at once, which a
    worker holding hundreds of jobs reaches as soon as they arrive together); closing the
    client closes its pool.

    With ``redis_sentinels`` set, connections go to the primary of ``redis_master_name`` as
    the Sentinels name it, asked again whenever a connection fails; ``redis_url`` then gives
    only the password, database and TLS.
    """
    retry = Retry(ExponentialBackoff(cap=BACKOFF_CAP, base=0.01), RETRIES)
    options: dict[str, Any] = {
        "max_connections": CONNECTIONS,
        "timeout": command_bound(settings),
        "retry": retry,
        # Without it a command on an open connection to a Redis that hangs waits forever.
        "socket_timeout": settings.redis_timeout,
    }
    if connect_timeout is not None:
        options["socket_connect_timeout"] = connect_timeout
    if not settings.redis_sentinels:
        pool = _WaitingPool.from_url(settings.redis_url, **options)
        return aioredis.Redis.from_pool(pool)
    primary: dict[str, Any] = dict(parse_url(settings.redis_url))
    primary.pop("host", None)
    primary.pop("port", None)
    if primary.pop("connection_class", None) is SSLConnection:
        primary["ssl"] = True  # Sentinel's pool picks its own TLS connection class
    reach: dict[str, Any] = {
        "socket_connect_timeout": connect_timeout or 5.0,
        "socket_timeout": settings.redis_timeout,
        # One try per question: the client's own retries ask the Sentinels again, and redis-py's
        # default backoff here made three refusing Sentinels take 12 s to report (0 s without).
        "retry": Retry(NoBackoff(), 0),
    }
    if settings.redis_sentinel_password:
        reach["password"] = settings.redis_sentinel_password
    sentinel = Sentinel(settings.sentinel_addresses, sentinel_kwargs=reach)  # type: ignore[no-untyped-call,unused-ignore]  # typed from redis 8.2
    client: aioredis.Redis = sentinel.master_for(
        settings.redis_master_name,
        connection_pool_class=_WaitingSentinelPool,
        **primary,
        **options,
    )
    return client


OWN_OPTIONS = {
    "max_connections": "",
    "timeout": "QUEUEGATE_REDIS_TIMEOUT",
    "socket_timeout": "QUEUEGATE_REDIS_TIMEOUT",
    "socket_connect_timeout": "QUEUEGATE_REDIS_TIMEOUT",
    "decode_responses": "",
}
"""Connection options a Redis URL may not set (see redis_connection), each with the setting
that sets it instead, if any."""


def redis_connection(url: str) -> object:
    """The connection redis-py makes of ``url``, unopened: its URL parser and connection class
    raise on what they cannot take (an option they do not know, such as libpq's
    ``?options=``; a value of the wrong type), which they would otherwise raise with a
    traceback at the first command. UrlRefused, saying what, for an option the gateway sets
    itself, and for what they take but Redis or the client fails on later, as Redis being
    unreachable or with a traceback: a path that is not a database number (redis-py ignores
    it: database 0), or a number in the query that is negative or not finite (``?db=-1``,
    ``?socket_timeout=nan``)."""
    # What redis_for sets itself: in the URL they would silently beat QUEUEGATE_REDIS_TIMEOUT
    # and the pool's size (redis-py lets a URL's options win), or clash with them through
    # Sentinel (a TypeError at start); decoded replies would break every script's reader.
    owned = sorted(OWN_OPTIONS.keys() & parse_url(url).keys())
    if owned:
        instead = sorted({OWN_OPTIONS[option] for option in owned} - {""})
        through = f" (from {' and '.join(instead)})" if instead else ""
        raise UrlRefused(f"its query sets {', '.join(owned)}, which the gateway sets{through}")
    connection: object = aioredis.ConnectionPool.from_url(url).make_connection()  # type: ignore[no-untyped-call]
    database = unquote(urlsplit(url).path).strip("/")
    if not url.startswith("unix:") and database and not database.isdecimal():
        raise UrlRefused("its path is not a database number")
    for value in parse_url(url).values():
        if isinstance(value, int | float) and not (math.isfinite(value) and value >= 0):
            raise UrlRefused("a number in the query is negative or not finite")
    return connection


def redis_place(settings: Settings) -> str:
    """The Redis ``settings`` reach, for a message: its URL without the password, or the
    primary the Sentinels name (the URL's host is not the one asked then)."""
    if settings.redis_sentinels:
        return (
            f"Redis primary {settings.redis_master_name!r} of the Sentinels at "
            f"{settings.redis_sentinels}"
        )
    return f"Redis at {redact_url(settings.redis_url)}"


def redis_unreachable(
    settings: Settings, how: str = "start it", cause: BaseException | None = None
) -> str:
    """The one line that says Redis did not answer, where it was looked for, and what to do
    (``how``: how to start it, when it is local); or, when ``cause`` says Redis answered and
    refused the credentials, that (starting it again would not help)."""
    if isinstance(cause, AuthenticationError | AuthenticationWrongNumberOfArgsError):
        return (
            f"{redis_place(settings)} refused the credentials ({cause}): "
            "set the right user and password in QUEUEGATE_REDIS_URL"
        )
    if settings.redis_sentinels:
        return (
            f"Redis primary {settings.redis_master_name!r} is not reachable through the "
            f"Sentinels at {settings.redis_sentinels}: start them and the primary, or set "
            "QUEUEGATE_REDIS_SENTINELS and QUEUEGATE_REDIS_MASTER_NAME"
        )
    return (
        f"Redis is not reachable at {redact_url(settings.redis_url)}: {how} or set "
        "QUEUEGATE_REDIS_URL"
    )


def text(raw: object) -> str:
    """A Redis reply's string: the client hands back bytes."""
    return raw.decode() if isinstance(raw, bytes) else str(raw)


@cache
def lua_source(package: str, name: str) -> str:
    """The Lua script ``<package>/lua/<name>.lua``, read once per process."""
    return resources.files(package).joinpath(f"lua/{name}.lua").read_text("utf-8")


async def eviction_policy(client: aioredis.Redis) -> str | None:
    """The ``maxmemory-policy`` of a Redis that evicts keys once full (a ``maxmemory`` set and
    a policy other than ``noeviction``), None for one that never does: a claim or a stored
    outcome evicted is a job called and answered again, as the memory epoch, kept without an
    expiry, outlives what a ``volatile-*`` policy evicts and tells nothing."""
    info = await client.info("memory")
    policy = str(info.get("maxmemory_policy", "noeviction"))
    return policy if int(info.get("maxmemory", 0)) and policy != "noeviction" else None


def evicting(place: str, policy: str) -> str:
    """What a Redis at ``place`` (``redis_place``) evicting keys by ``policy`` means, and
    what to set: the worker's refusal at start and its error line while running."""
    return (
        f"{place} evicts keys when full (maxmemory-policy {policy}), and a job whose claim or "
        "stored outcome it evicts is called and answered again: set its maxmemory-policy to "
        "noeviction"
    )
