"""The PostgreSQL pool every component uses, bound to the gateway's schema."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg

from queuegate.errors import ConfigError, ServiceUnavailable
from queuegate.settings import Settings
from queuegate.start_wait import StartWait
from queuegate.urls import redact_quoted, redact_url

log = logging.getLogger(__name__)


CONNECT_TIMEOUT = 10.0
"""Seconds to wait for a connection; asyncpg's default (60 s) hides an outage for a minute."""
RETRY_FIRST = 0.1
RETRY_CAP = 2.0
"""Seconds between a held lookup's attempts while PostgreSQL is unreachable: doubling, capped."""

UNREACHABLE: tuple[type[Exception], ...] = (
    # Refused, reset or timed out on the socket: the server is down or the network is.
    OSError,
    TimeoutError,
    # Lost mid-operation ("connection was closed in the middle of operation"), or refused.
    asyncpg.PostgresConnectionError,
    # Shut down by an operator or a crash, starting up, shutting down, statement cancelled.
    asyncpg.OperatorInterventionError,
    # A connection or pool left unusable by a loss ("connection is closed").
    asyncpg.InterfaceError,
    # The protocol's state broken by a loss mid-operation: "cannot switch to state 12;
    # another operation is in progress", met on a pooled connection after a restart.
    asyncpg.InternalClientError,
)
"""What asyncpg raises when PostgreSQL goes away before, during or after an operation: the
one list of "the database is unreachable" that every component catches. Each of them is
passing: the same call succeeds once the server is back (on a fresh connection; see
``reconnect``)."""

DB_ERRORS: tuple[type[Exception], ...] = (*UNREACHABLE, asyncpg.PostgresError)
"""Every failure of a database call that is not a bug of ours: unreachable, or an error the
server reported (a missing table before ``migrate``, a value it refuses)."""

_CONNECT_ERRORS = (
    *UNREACHABLE,
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidCatalogNameError,
)


def is_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says PostgreSQL is unreachable (see ``UNREACHABLE``)."""
    return isinstance(exc, UNREACHABLE)


async def reconnect(pool: asyncpg.Pool) -> None:
    """Have the pool open fresh connections: those it holds may have outlived their server.

    Call it after an ``UNREACHABLE`` error; a connection in use is replaced when released.
    """
    await pool.expire_connections()


Prepare = Callable[[asyncpg.Connection], Awaitable[None]]
"""Session state a pool's caller wants on each of its connections, set up once it opens."""

NAME_BYTES = 63
"""The most a PostgreSQL name holds: an identifier (a LISTEN channel's name) or an
``application_name``; a longer one is cut, or refused."""
WORKER_APPLICATION = "queuegate worker"


def worker_application_name(namespace: str) -> str:
    """What a worker of ``namespace`` names its connections to PostgreSQL (``application_name``,
    seen by every role in ``pg_stat_activity``), for ``teams set`` to count the namespace's
    running workers by, which Redis can lose. The namespace itself when it fits, else its md5
    after ``#``, which no namespace holds: cut at ``NAME_BYTES``, two long namespaces alike
    at the start would count each other's workers."""
    name = f"{WORKER_APPLICATION} {namespace}"
    if len(name.encode()) <= NAME_BYTES:
        return name
    return f"{WORKER_APPLICATION} #{hashlib.md5(namespace.encode()).hexdigest()}"


async def create_pool(
    settings: Settings,
    *,
    min_size: int = 1,
    max_size: int = 4,
    reset_sessions: bool = True,
    prepare: Prepare | None = None,
    application_name: str | None = None,
) -> asyncpg.Pool:
    """A pool whose connections resolve unqualified names in ``settings.database_schema``.

    The schema is created when missing. The caller closes it: ``await pool.close()``.
    ``reset_sessions=False`` skips asyncpg's session reset (``RESET ALL``, ``UNLISTEN *``...:
    a round trip) when a connection goes back to the pool, for callers that leave no session
    state behind (every lock here is a transaction's); an open transaction is still rolled back.
    ``prepare`` runs on each connection once it opens (a temporary table its statements use),
    not at each use. ``application_name`` names its connections in ``pg_stat_activity`` (over
    one the URL may give).
    """
    schema = settings.database_schema
    named = {} if application_name is None else {"application_name": application_name}
    try:
        pool = await asyncpg.create_pool(
            settings.database_url,
            min_size=min_size,
            max_size=max_size,
            timeout=CONNECT_TIMEOUT,
            server_settings={"search_path": schema, **named},
            init=_init_connection if prepare is None else functools.partial(_init_then, prepare),
            reset=None if reset_sessions else _keep_session,
        )
    except asyncpg.ClientConfigurationError as exc:
        raise _unusable(settings, exc) from None
    except _CONNECT_ERRORS as exc:
        raise ServiceUnavailable(database_unreachable(settings, exc)) from exc
    try:
        # Also the first connection when min_size is 0: a wrong URL fails here, not later.
        async with pool.acquire() as conn, conn.transaction():
            await lock_schema(conn, schema)
            # Created meanwhile all the same, now and then, under the lock (a worker and
            # accounting starting together as PostgreSQL came up, once in a full test run):
            # the schema is there, which is all this asks.
            with contextlib.suppress(asyncpg.UniqueViolationError):
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}")
    except _CONNECT_ERRORS as exc:
        await pool.close()
        raise ServiceUnavailable(database_unreachable(settings, exc)) from exc
    except BaseException:
        await pool.close()
        raise
    return pool


@contextlib.asynccontextmanager
async def connection(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    """One connection, set up as a pool's are (``create_pool``), for a command's single query:
    a pool would open, and close, more than it needs. Creates no schema: a query on a schema
    never migrated fails on its missing table. Dropped at once when the query fails or is
    cancelled."""
    try:
        conn = await asyncpg.connect(
            settings.database_url,
            timeout=CONNECT_TIMEOUT,
            server_settings={"search_path": settings.database_schema},
        )
    except asyncpg.ClientConfigurationError as exc:
        raise _unusable(settings, exc) from None
    except _CONNECT_ERRORS as exc:
        raise ServiceUnavailable(database_unreachable(settings, exc)) from exc
    try:
        await _init_connection(conn)
        yield conn
    except BaseException:
        # Not closed gracefully: that waits for the server's goodbye, which one that hangs
        # (the caller's reason to give up, often) never sends.
        conn.terminate()
        raise
    await conn.close()


async def _keep_session(_: asyncpg.Connection) -> None:
    """A pool's reset that leaves the session as it is (see ``create_pool``)."""


async def wait_for_pool(
    settings: Settings,
    *,
    min_size: int = 1,
    max_size: int = 4,
    reset_sessions: bool = True,
    prepare: Prepare | None = None,
    application_name: str | None = None,
) -> asyncpg.Pool:
    """``create_pool``, waiting while PostgreSQL is unreachable (``StartWait``)."""
    waiting = StartWait(log, "PostgreSQL")
    while True:
        try:
            pool = await create_pool(
                settings,
                min_size=min_size,
                max_size=max_size,
                reset_sessions=reset_sessions,
                prepare=prepare,
                application_name=application_name,
            )
        except ServiceUnavailable as exc:
            await waiting.failed(str(exc))
        else:
            waiting.answered()
            return pool


def _unusable(settings: Settings, exc: asyncpg.ClientConfigurationError) -> ConfigError:
    """A URL with an option asyncpg cannot use (``?sslmode=bogus``), said so: no wait helps
    (it was waited for, and said as PostgreSQL not reachable)."""
    said = redact_quoted(str(exc), settings.database_url)
    return ConfigError(
        f"invalid QUEUEGATE_DATABASE_URL: its client cannot use it ({said}): correct it and "
        "run again"
    )


def database_unreachable(
    settings: Settings, cause: BaseException | None = None, how: str = "start it"
) -> str:
    """The one line that says PostgreSQL did not answer, where it was looked for (no
    password) and what to do (``how``: how to start it); or, when ``cause`` says it
    answered, what it refused: the credentials, or a database it does not have (starting it
    again would help neither)."""
    url = redact_url(settings.database_url)
    if isinstance(cause, asyncpg.InvalidCatalogNameError):
        return (
            f"PostgreSQL at {url} answered: {cause}: create it (createdb NAME) or name an "
            "existing one in QUEUEGATE_DATABASE_URL"
        )
    if isinstance(cause, asyncpg.InvalidAuthorizationSpecificationError):
        return (
            f"PostgreSQL at {url} refused the credentials "
            f"({redact_quoted(str(cause), settings.database_url)}): set the right user and "
            "password in QUEUEGATE_DATABASE_URL"
        )
    return f"PostgreSQL is not reachable at {url}: {how} or set QUEUEGATE_DATABASE_URL"


def quote_ident(name: str) -> str:
    """``name`` as a PostgreSQL identifier, safe to put into SQL text."""
    return '"' + name.replace('"', '""') + '"'


async def lock_schema(conn: asyncpg.Connection, schema: str) -> None:
    """Hold the schema's advisory lock until the transaction ends.

    DDL on one schema (creating it, migrating it) from several processes at once would race
    on the catalog, so every such transaction takes this lock first.
    """
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"queuegate.ddl.{schema}")


async def _init_then(prepare: Prepare, conn: asyncpg.Connection) -> None:
    await _init_connection(conn)
    await prepare(conn)


class TooDeep(str):
    """A json or jsonb value nested deeper than Python's parser reads, kept as its text: raised
    from the codec (RecursionError), it failed the whole query, and one registry row of 3,000
    nested arrays (6 KB, written with SQL) stopped every worker of every team."""


def _json_value(text: str) -> object:
    try:
        return json.loads(text)
    except RecursionError:
        return TooDeep(text)


async def _init_connection(conn: asyncpg.Connection) -> None:
    # jsonb (teams.config) reads and writes as Python dicts and lists instead of strings.
    for typename in ("json", "jsonb"):
        await conn.set_type_codec(
            typename, schema="pg_catalog", encoder=json.dumps, decoder=_json_value
        )
