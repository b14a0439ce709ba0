"""How fast a worker carries out one team's control requests: a team's flood paces itself.

A worker serves every team's control queue on one event loop, beside every team's jobs. Held
only by its prefetch, one team sending batch steps back to back kept a worker busy with them
(1,000-id index steps at 67 a second took 79 % of its CPU) and another team's jobs, one at a
time, went from a p50 of 6 ms to 22 ms and a p99 of 10 ms to 109 ms. Each team's requests
now wait their turn by what they cost: the bytes the worker reads and answers, and a fixed
share for the proof and the Redis round trips of a request of any size. What waits holds one
of the team's control slots (``workers.control.PREFETCH``), so the rest of a flood waits in
the team's own bounded control queue, which refuses it once full. An answer is charged once
sent, to the requests that follow.

The rate is far above what a team's tools need: a batch of a million lines with 64-character
custom ids sends and is answered about 500 MB over its submit and collect, 8 minutes of one
worker's pace, against the hours its calls take at any team's rate; with several workers
each paces its own share.
"""

from __future__ import annotations

import time

RATE = 1_000_000
"""Bytes a second of one team's control requests and their answers a worker carries out."""
BURST = 4_000_000
"""Bytes of one team's requests carried out at once after a quiet spell: a collect's steps
after a pause are not held up."""
REQUEST_COST = 10_000
"""What a request costs beside its bytes: its proof, its answer and its first Redis round
trips, so at most 100 small requests a second. At 4 KB (250 a second), one team's `batch
list` requests took another's one-at-a-time jobs from a p50 of 3.2 ms to 5.0, and two
teams' to 2.8 times their p50."""


class Pace:
    """When each of one team's control requests may be carried out::

    pace = Pace()
    await asyncio.sleep(pace.wait(len(body)))
    """

    def __init__(self) -> None:
        self.rate = RATE
        """Bytes a second."""
        self._burst = BURST / RATE
        """Seconds of requests carried out ahead of the rate."""
        self._due = 0.0
        """When the requests taken so far would have been carried out at the rate, each
        after the one before (monotonic seconds)."""

    def wait(self, size: int) -> float:
        """Seconds the next request, of ``size`` bytes, waits for its turn; its turn taken."""
        now = time.monotonic()
        self._due = max(self._due, now) + (size + REQUEST_COST) / self.rate
        return max(0.0, self._due - self._burst - now)

    def charge(self, cost: float) -> None:
        """Count ``cost`` bytes' worth of work a request turned out to make, against the
        requests still to come."""
        self._due += cost / self.rate
