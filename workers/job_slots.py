"""The jobs a worker holds of one team: at most ``STARTED`` run at once, the rest wait as
their bare deliveries until a running one ends.

A job started holds its parsed request, aio-pika's message, its task and the frames of its
path (about 6 KB), and a started job past what the provider connections carry (the router's
``MAX_CONNECTIONS``) only waits for a connection or a Redis round trip with all of that. A
bare delivery is its frames' bytes and pamqp's decoded properties. With 5,000 jobs held,
about 3,000 waiting so took the worker's peak resident memory from 127-132 MB to 119-121
at the same rate (``python -m bench --own-broker --own-services latency``, three pairs).

Per team, not per worker: a team whose jobs wait for its rate limit (admission holds them
until its tokens allow) fills only its own slots, never another team's.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from aiormq.abc import DeliveredMessage

from queuegate.broker import Delivery
from router.transport import MAX_CONNECTIONS

STARTED = 2 * MAX_CONNECTIONS
"""Jobs of one team started at once: every provider connection busy, and as many more
before and after their calls (claim, admission; storing, publishing, settling)."""


class JobSlots:
    """One team's held jobs: the started ones counted, the others waiting in arrival order.

    ``start`` runs a job (its task must call ``ended`` when it ends); ``drop`` is told of a
    waiting delivery whose channel closed before its turn: the broker delivers it again, and
    starting it would call a provider for a job that is no longer this worker's."""

    __slots__ = ("_drop", "_limit", "_start", "_waiting", "running")

    def __init__(
        self,
        start: Callable[[DeliveredMessage, Delivery], None],
        drop: Callable[[], None],
        *,
        limit: int = STARTED,
    ) -> None:
        self._start = start
        self._drop = drop
        self._limit = limit
        self._waiting: deque[tuple[DeliveredMessage, Delivery]] = deque()
        self.running = 0

    def __len__(self) -> int:
        """Held: started and not ended, or waiting."""
        return self.running + len(self._waiting)

    def arrived(self, delivered: DeliveredMessage) -> None:
        # Its channel's settlements must know its tag at once (see Delivery).
        self._waiting.append((delivered, Delivery(delivered)))
        self._fill()

    def ended(self) -> None:
        self.running -= 1
        self._fill()

    def take_all(self) -> list[Delivery]:
        """Every waiting delivery, none started (a drain returns them to the queue)."""
        taken = [delivery for _, delivery in self._waiting]
        self._waiting.clear()
        return taken

    def _fill(self) -> None:
        while self.running < self._limit and self._waiting:
            delivered, delivery = self._waiting.popleft()
            if delivered.channel.is_closed:
                self._drop()
                continue
            self.running += 1
            self._start(delivered, delivery)
