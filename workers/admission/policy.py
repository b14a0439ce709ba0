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

import math
import time
from collections.abc import Sequence
from typing import Literal

from workers.admission.buckets import Limit, Take, too_large

OutagePolicy = Literal["fail_closed", "fail_open"]

RETRY_SECONDS = 0.5
"""How often a fail-closed job tries Redis again while it is down."""


MEANWHILE: dict[OutagePolicy, str] = {
    "fail_closed": "jobs wait for admission",
    "fail_open": "admission uses local buckets at a fair share and budgets go unchecked",
}
"""What each policy does while Redis is away, for the one line logged per outage."""


class LocalBuckets:
    """In-process buckets for ``fail_open``: the same algorithm as ``take.lua``, at ``share``
    of each limit, on this process's monotonic clock."""

    def __init__(self, share: float) -> None:
        self._share = share
        self._levels: dict[tuple[str, int], tuple[float, float]] = {}

    def take(self, limits: Sequence[Limit], tokens: int, within_ms: int = 0) -> Take:
        now = time.monotonic()
        need = (1, tokens)
        current: dict[tuple[str, int], float] = {}
        wait = 0.0
        for limit in limits:
            for d, (rate, cap) in enumerate(self._dimensions(limit)):
                if rate <= 0:
                    continue
                if need[d] > cap:
                    raise too_large(limit, tokens)
                level, at = self._levels.get((limit.key, d), (cap, now))
                level = min(cap, level + (now - at) * rate / 60)
                current[(limit.key, d)] = level
                if level < need[d]:
                    wait = max(wait, (need[d] - level) * 60 / rate)
        wait_ms = max(1, math.ceil(wait * 1000)) if wait > 0 else 0
        if wait_ms > within_ms:
            return Take(False, wait_ms)
        for (key, d), level in current.items():
            self._levels[(key, d)] = (level - need[d], now)
        return Take(True, wait_ms)

    def _dimensions(self, limit: Limit) -> tuple[tuple[float, float], tuple[float, float]]:
        """(per-minute rate, capacity) of requests and of tokens, at this process's share."""
        rpm, tpm = (limit.rpm or 0) * self._share, (limit.tpm or 0) * self._share
        # At least one request: a share of a small burst below one would admit nothing.
        requests = max(1.0, (limit.burst or limit.rpm or 0) * self._share)
        return (rpm, requests), (tpm, tpm)
