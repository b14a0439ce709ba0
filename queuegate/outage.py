"""Saying once that a service went away, and once that it came back, however many jobs meet it."""

from __future__ import annotations

import logging


class OutageLog:
    """One warning when the first call fails, one info line when a call succeeds again::

    outage = OutageLog(log, "Redis", "finished jobs are not remembered")
    try: ...
    except RedisError as exc: outage.failed(exc)
    else: outage.recovered()
    """

    def __init__(self, logger: logging.Logger, service: str, meanwhile: str) -> None:
        self._log = logger
        self._service = service
        self._meanwhile = meanwhile
        self.down = False

    def failed(self, exc: BaseException) -> None:
        if not self.down:
            self.down = True
            self._log.warning(
                "%s unavailable (%s): %s until it returns",
                self._service,
                type(exc).__name__,
                self._meanwhile,
            )

    def recovered(self) -> None:
        if self.down:
            self.down = False
            self._log.info("%s is back", self._service)
