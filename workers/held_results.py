"""Results a team's own consumer holds unacknowledged, counted against its queues' bounds.

RabbitMQ counts only ready messages against a queue's ``max-length`` and
``max-length-bytes``: a team's consumer with no prefetch limit (``basic.qos`` 0, which the
team's user may set on any queue it may read) takes each result as it comes and never
acknowledges it, so its reply queue never fills and the broker keeps every result in memory.
RabbitMQ 3.10 has nothing to bound it: no prefetch a broker imposes, no per-queue consumer
timeout (3.11.15, 3.12), and ``consumer_timeout`` bounds a delivery's age, not how many: the
channel closed, the results go back to the queue and the consumer takes them all again.

So the workers count them: every ``INTERVAL`` seconds, one look at the management API lists
the namespace's team reply and results queues with what each holds, ready and
unacknowledged; a queue holding its bound or more of them together (``Bound``) is *held
full*, and a result for it is not sent, as if the broker had refused it (recorded
``reply_delivered = false``; the job sent again is answered from its stored outcome). A
consumer past the bound then holds at most what reached it before the next look, the
broker's statistics included (gathered every 5 s): ``INTERVAL`` plus 5 s of its team's
results. One worker of the namespace looks per interval (whichever takes
``Keys.held_full_look`` first) and writes what it found to Redis, where every worker reads
it: a look costs the management API about as much as listing the vhost's queues, hundreds
of milliseconds for a thousand, which each of many workers would pay again. While the
management API or Redis does not answer, no queue is held full: results are sent as the
broker's bounds alone allow, rather than refused on a look grown old.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError
from yarl import URL

from queuegate.keys import Keys
from queuegate.management import ManagementApi, vhost_path
from queuegate.runtime import until_set
from queuegate.settings import Settings
from queuegate.topology import Bound, Topology

log = logging.getLogger(__name__)

INTERVAL = 5.0
"""Seconds between two looks at what the teams' reply queues hold."""
TIMEOUT = 10.0
"""Seconds one look may take."""
FAILED_LOG_INTERVAL = 300.0
"""Seconds between two log lines saying the management API did not answer."""
PAGE = 500
"""Queues listed per request: the most the management API gives in one page."""
COLUMNS = (
    "name",
    "messages_ready",
    "messages_unacknowledged",
    "message_bytes_ready",
    "message_bytes_unacknowledged",
)


class HeldResults:
    """The team reply queues held full, looked up in the background::

    held = HeldResults(settings, redis)
    task = asyncio.create_task(held.run(stop))
    if held.full(reply_to): ...  # do not send it

    Over aiohttp, the worker's HTTP client for providers, not ``queuegate.management``'s
    httpx, which a worker process would load for this one request (see tests/test_layout.py).
    """

    def __init__(self, settings: Settings, redis: aioredis.Redis) -> None:
        api = ManagementApi.of(settings.management_url)
        credentials = f"{api.user or ''}:{api.password or ''}".encode()
        self._headers = {"Authorization": "Basic " + base64.b64encode(credentials).decode()}
        self._queues = URL(f"{api.root}queues/{vhost_path(settings.vhost)}", encoded=True)
        self._display = api.display
        self._pattern = Topology.of(settings).team_reply_queues_pattern()
        self._bound = Bound.of(settings)
        self._redis = redis
        self._keys = Keys(settings.redis_prefix)
        self._full: frozenset[str] = frozenset()
        self._failed_logged = -FAILED_LOG_INTERVAL

    def full(self, queue: str) -> bool:
        """Whether ``queue`` held its bound or more, ready and unacknowledged, at the last look."""
        return queue in self._full

    async def run(self, stop: asyncio.Event) -> None:
        timeout = aiohttp.ClientTimeout(total=TIMEOUT)
        async with aiohttp.ClientSession(headers=self._headers, timeout=timeout) as http:
            while not stop.is_set():
                await self._refresh(http)
                await until_set(INTERVAL, stop)

    async def _refresh(self, http: aiohttp.ClientSession) -> None:
        """Look, if no other worker does this interval, or else read the last look's answer."""
        try:
            # Taken for a little less than an interval, so that the next worker to come
            # round finds it free and a look is never skipped for an interval.
            ours = await self._redis.set(
                self._keys.held_full_look, "1", nx=True, px=int(INTERVAL * 900)
            )
            if ours:
                full = await self._look(http)
            else:
                found = await self._redis.get(self._keys.held_full)
                full = orjson.loads(found) if found else []
        except RedisError as exc:
            self._full = frozenset()
            self._say_missing("Redis, which every worker reads the look from", exc)
            return
        self._full = frozenset(full)

    async def _look(self, http: aiohttp.ClientSession) -> list[str]:
        """The queues held full, written to Redis for every worker; none while the management
        API does not answer."""
        try:
            queues = await self._list(http)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:  # ValueError: not JSON
            await self._redis.delete(self._keys.held_full)
            self._say_missing(
                f"the management API {self._display}; check QUEUEGATE_MANAGEMENT_URL", exc
            )
            return []
        full = sorted(q["name"] for q in queues if self._holds_its_bound(q))
        for queue in set(full) - self._full:
            log.warning(
                "reply queue %s holds its bound, its consumer's unacknowledged results "
                "counted: no result is sent to it until they are acknowledged",
                queue,
            )
        # Kept a few intervals, so a look that is late does not drop the queues at once.
        await self._redis.set(self._keys.held_full, orjson.dumps(full), px=int(3 * INTERVAL * 1000))
        return full

    def _say_missing(self, what: str, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._failed_logged >= FAILED_LOG_INTERVAL:
            self._failed_logged = now
            log.warning(
                "could not see what the teams' reply queues hold (%s: %s: %s): results "
                "their consumers hold unacknowledged are not counted until it answers "
                "(said once per %.0f s)",
                what,
                type(exc).__name__,
                exc,
                FAILED_LOG_INTERVAL,
            )

    async def _list(self, http: aiohttp.ClientSession) -> list[dict[str, Any]]:
        """The team reply queues, page by page: the API filters by name only when paging."""
        found: list[dict[str, Any]] = []
        page, pages = 1, 1
        while page <= pages:
            query: dict[str, str | int] = {
                "page": page,
                "page_size": PAGE,
                "name": self._pattern,
                "use_regex": "true",
                "columns": ",".join(COLUMNS),
            }
            async with http.get(self._queues.with_query(query)) as response:
                response.raise_for_status()
                result = await response.json()
            found += result.get("items", [])
            page, pages = page + 1, int(result.get("page_count", 0))
        return found

    def _holds_its_bound(self, queue: dict[str, Any]) -> bool:
        def total(*columns: str) -> int:
            return sum(int(value) for c in columns if isinstance(value := queue.get(c), int))

        count = total("messages_ready", "messages_unacknowledged")
        size = total("message_bytes_ready", "message_bytes_unacknowledged")
        return count >= self._bound.max_length or size >= self._bound.max_bytes
