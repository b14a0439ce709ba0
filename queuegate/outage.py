"""Saying once that a service went away, and once that it came back, however many jobs meet it."""

from __future__ import annotations

import logging
import time

BRIEF = 240
"""Most characters of an exception's text in an outage line."""


def brief(exc: BaseException) -> str:
    """The exception's text, cut to BRIEF characters: redis-py appends its client's whole repr
    (every pool and connection, 1-2 KB) to a Sentinel's "No master found for 'name' : <...>"."""
    text = " ".join(str(exc).split(" : <", 1)[0].split())
    return text if len(text) <= BRIEF else f"{text[:BRIEF]}…"


class OutageLog:
    """One warning when the first call fails, one info line (with how long it lasted) when a
    call succeeds again::

    outage = OutageLog(log, "Redis", "finished jobs are not remembered")
    try: ...
    except RedisError as exc: outage.failed(exc)
    else: outage.recovered()
    """

    def __init__(self, logger: logging.Logger, service: str, meanwhile: str) -> None:
        self._log = logger
        self._service = service
        self._meanwhile = meanwhile
        self._since: float | None = None

    @property
    def down(self) -> bool:
        return self._since is not None

    def failed(self, exc: BaseException) -> None:
        if self._since is None:
            self._since = time.monotonic()
            self._log.warning(
                "%s unavailable (%s: %s): %s until it returns",
                self._service,
                type(exc).__name__,
                brief(exc),
                self._meanwhile,
            )

    def recovered(self) -> None:
        if self._since is not None:
            down, self._since = time.monotonic() - self._since, None
            self._log.info("%s is back after %.1f s", self._service, down)
