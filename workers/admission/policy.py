"""What admission does while Redis is unreachable: the ``redis_outage`` setting.

- ``fail_closed``: nothing is admitted without Redis; jobs wait and retry until it returns,
  up to their deadline (or the maximum wait), then are answered ``rate_limited``. Safe for
  the provider's limits and the budgets; jobs stall during the outage.
- ``fail_open``: each worker admits from a bucket of its own holding its fair share of each
  limit (1/``admission_workers``), so the organisation stays under its limits if the share is
  right; budgets are not enforced until Redis returns (spend is still recorded by accounting).

An outage is logged once when it starts and once when it ends, not once per job.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Literal

from workers.admission.buckets import Limit, too_large

log = logging.getLogger(__name__)

OutagePolicy = Literal["fail_closed", "fail_open"]

RETRY_SECONDS = 0.5
"""How often a fail-closed job tries Redis again while it is down."""


class Outage:
    """Tracks whether Redis is down, so the outage is logged once, not once per job."""

    def __init__(self, policy: OutagePolicy) -> None:
        self.policy = policy
        self.down = False

    def failed(self, exc: Exception) -> None:
        if not self.down:
            self.down = True
            what = (
                "jobs wait for it"
                if self.policy == "fail_closed"
                else "admitting from local buckets at a fair share, budgets unchecked"
            )
            log.warning("Redis unavailable for admission (%s): %s", type(exc).__name__, what)

    def succeeded(self) -> None:
        if self.down:
            self.down = False
            log.info("Redis is back: admission uses the shared buckets again")


class LocalBuckets:
    """In-process buckets for ``fail_open``: the same algorithm as ``take.lua``, at ``share``
    of each limit, on this process's monotonic clock."""

    def __init__(self, share: float) -> None:
        self._share = share
        self._levels: dict[tuple[str, int], tuple[float, float]] = {}

    def take(self, limits: Sequence[Limit], tokens: int) -> int:
        now = time.monotonic()
        need = (1, tokens)
        current: dict[tuple[str, int], float] = {}
        wait = 0.0
        for limit in limits:
            for d, cap in enumerate(self._caps(limit)):
                if cap <= 0:
                    continue
                if need[d] > cap:
                    raise too_large(limit, tokens)
                level, at = self._levels.get((limit.key, d), (cap, now))
                level = min(cap, level + (now - at) * cap / 60)
                current[(limit.key, d)] = level
                if level < need[d]:
                    wait = max(wait, (need[d] - level) * 60 / cap)
        if wait > 0:
            return max(1, round(wait * 1000))
        for (key, d), level in current.items():
            self._levels[(key, d)] = (level - need[d], now)
        return 0

    def _caps(self, limit: Limit) -> tuple[float, float]:
        return ((limit.rpm or 0) * self._share, (limit.tpm or 0) * self._share)
