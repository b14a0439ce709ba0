"""A running process told at once that a team's config changed, rather than at its next
registry read (every ``teams_refresh`` seconds).

``set_team_config`` (what ``queuegate teams set`` runs) sends a PostgreSQL notification on
its schema's channel (``NOTIFY``) in the transaction that writes the config, so it is sent
when the write commits and never for a write rolled back. A process listens on a connection
of its own::

    async with RegistryChanges(settings, on_change):
        ...   # on_change("alpha") when alpha's config changed, in this schema

Each schema has a channel of its own (``_channel``): gateways sharing a database in
different schemas never wake each other's listeners.

``on_change(None)`` each time the listener starts listening, the first time included:
whatever changed while it was not (before it started, while PostgreSQL was away) is not
told, so the process reads everything again. A listener that cannot connect retries in the
background; meanwhile the process's periodic read is what catches changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from types import TracebackType
from typing import Self

import asyncpg

from queuegate.db import CONNECT_TIMEOUT, DB_ERRORS, NAME_BYTES
from queuegate.settings import Settings
from queuegate.start_wait import START_RETRY_MAX
from queuegate.urls import redact_url

log = logging.getLogger(__name__)

PREFIX = "queuegate_team_config"
"""What every schema's channel name starts with (``_channel``)."""


def _channel(schema: str) -> str:
    """SQL for the channel of the schema that the SQL text ``schema`` names: readable
    (``queuegate_team_config.<schema>``) when it fits, else the schema's md5 after ``#``, which
    no schema's name holds, so the two forms never meet. In SQL, so that a writer needs
    nothing but its connection's ``current_schema()``."""
    fits = NAME_BYTES - len(PREFIX) - 1
    return (
        f"CASE WHEN octet_length({schema}) <= {fits} THEN '{PREFIX}.' || {schema}"
        f" ELSE '{PREFIX}#' || md5({schema}) END"
    )


NOTIFY = f"SELECT pg_notify({_channel('current_schema()')}, $1)"
"""The notification of team ``$1``'s change, on the channel of the schema the connection
writes in."""


def notifying(write: str) -> str:
    """SQL for ``write``, a statement on team ``$1`` returning its change as ``change``, that
    also sends its notification (``NOTIFY``), in one statement: committed with the write as
    PostgreSQL runs it. A notification of its own after an autocommitted write could hang
    with the write stored, leaving ``queuegate teams`` unable to say whether it was."""
    return (
        f"WITH written AS ({write})"
        f" SELECT change, pg_notify({_channel('current_schema()')}, $1) FROM written"
    )


class RegistryChanges:
    def __init__(
        self,
        settings: Settings,
        on_change: Callable[[str | None], None],
        *,
        application_name: str | None = None,
    ) -> None:
        """``application_name``: the listening connection's name in ``pg_stat_activity``."""
        self._url = settings.database_url
        self._named = {} if application_name is None else {"application_name": application_name}
        self._schema = settings.database_schema
        self._on_change = on_change
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._listen())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _listen(self) -> None:
        delay, said = 0.5, False
        while True:
            try:
                connection = await asyncpg.connect(
                    self._url, timeout=CONNECT_TIMEOUT, server_settings=self._named
                )
            except DB_ERRORS as exc:
                if not said:
                    said = True
                    log.warning(
                        "team config changes are read every refresh, not told at once: "
                        "cannot listen on %s (%s); retrying",
                        redact_url(self._url),
                        exc,
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, START_RETRY_MAX)
                continue
            delay, said = 0.5, False
            try:
                await self._until_lost(connection)
            except DB_ERRORS as exc:
                log.debug("team config listener lost: %s", exc)
            finally:
                # Cancelled at the process's end, or lost: either way this connection is done.
                connection.terminate()

    async def _until_lost(self, connection: asyncpg.Connection) -> None:
        lost = asyncio.Event()
        connection.add_termination_listener(lambda _: lost.set())
        channel = await connection.fetchval(f"SELECT {_channel('$1::text')}", self._schema)
        await connection.add_listener(channel, self._notified)
        self._on_change(None)
        await lost.wait()

    def _notified(self, _connection: object, _pid: int, _name: str, payload: object) -> None:
        self._on_change(str(payload))


__all__ = ["NOTIFY", "RegistryChanges", "notifying"]
