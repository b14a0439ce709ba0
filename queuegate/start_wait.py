"""Waiting at a process's start for a service that does not answer yet: a long-running
process started during an outage, or restarted by its supervisor, waits for it instead of
exiting, trying again 0.5 s later, then twice as long each time up to ``START_RETRY_MAX``;
one line, then one a minute, says so::

    waiting = StartWait(log, "PostgreSQL")
    while True:
        try:
            return await connect()
        except Unreachable as exc:
            await waiting.failed(str(exc))   # logs when due, then sleeps
"""

from __future__ import annotations

import asyncio
import logging
import time

START_RETRY_MAX = 10.0
"""Seconds between a starting process's attempts to reach a service, at most."""
START_LOG_EVERY = 60.0
"""Seconds between the lines a process waiting for a service logs."""


class StartWait:
    """The waits between one start's attempts to reach ``service``."""

    def __init__(self, log: logging.Logger, service: str) -> None:
        self._log = log
        self._service = service
        self._delay = 0.5
        self._said: float | None = None
        self._since = time.monotonic()

    async def failed(self, why: str) -> None:
        """An attempt failed for ``why`` (what was tried and what came): said when a line is
        due, then waited out before the next."""
        now = time.monotonic()
        if self._said is None or now - self._said >= START_LOG_EVERY:
            self._said = now
            self._log.warning(
                "%s; waiting for it (retrying every %.0f s at most)", why, START_RETRY_MAX
            )
        await asyncio.sleep(self._delay)
        self._delay = min(self._delay * 2, START_RETRY_MAX)

    def answered(self) -> None:
        """The service answered: said, if its wait was."""
        if self._said is not None:
            self._log.info(
                "%s answers after %.1f s; starting", self._service, time.monotonic() - self._since
            )
