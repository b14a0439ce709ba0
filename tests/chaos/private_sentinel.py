"""A Redis primary, one replica and three Sentinels of the test's own, on loopback.

The shared Redis on 6379 is never touched: these five processes run on free ports with their
files in a temporary directory, Sentinels quick to act (``DOWN_AFTER_MS``), and are stopped
when the block ends::

    async with PrivateSentinels(tmp_path) as group:
        s = group.settings(settings)   # QUEUEGATE_REDIS_SENTINELS and the master name
        await group.failover()         # SENTINEL FAILOVER: the replica becomes the primary
        await group.kill_primary()     # SIGKILL: the Sentinels promote the replica
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import TracebackType

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from bench.chaos import PrivateRedis
from queuegate.settings import Settings

MASTER = "qgt-primary"
DOWN_AFTER_MS = 1000
"""Milliseconds without an answer before a Sentinel holds the primary down (30 s by default):
short, so tests are quick, yet longer than a busy machine may leave Redis unscheduled."""
FAILOVER_TIMEOUT_MS = 5000
QUORUM = 2
PROMOTION_TIMEOUT = 30.0
"""Seconds a failover may take, from the primary's loss to every Sentinel naming another."""


class PrivateSentinels:
    def __init__(self, root: Path) -> None:
        primary = PrivateRedis("--dir", str(_made(root / "node-a")))
        replica_of = ("--replicaof", "127.0.0.1", str(primary.port))
        self.nodes = [primary, PrivateRedis("--dir", str(_made(root / "node-b")), *replica_of)]
        self.sentinels: list[PrivateRedis] = []
        for i in range(3):
            here = _made(root / f"sentinel-{i}")
            config = here / "sentinel.conf"  # Sentinel rewrites it as it learns
            config.write_text(
                f"sentinel monitor {MASTER} 127.0.0.1 {self.nodes[0].port} {QUORUM}\n"
                f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {MASTER} {FAILOVER_TIMEOUT_MS}\n"
            )
            self.sentinels.append(PrivateRedis("--dir", str(here), "--sentinel", config=config))
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> PrivateSentinels:
        async with contextlib.AsyncExitStack() as stack:
            for process in [*self.nodes, *self.sentinels]:
                await stack.enter_async_context(process)
            await self._until(self._watching, "the Sentinels did not find each other")
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()

    def settings(self, base: Settings) -> Settings:
        """``base`` reaching Redis through these Sentinels."""
        return base.model_copy(
            update={
                "redis_sentinels": ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels),
                "redis_master_name": MASTER,
            }
        )

    async def primary(self) -> PrivateRedis:
        """The node the Sentinels name primary now."""
        port = await self._named(self.sentinels[0])
        return next(node for node in self.nodes if node.port == port)

    async def failovers(self) -> int:
        """Failovers so far, as the Sentinels count them (their configuration epoch): more
        than asked for when they held a busy primary down on their own."""
        async with _client(self.sentinels[0]) as client:
            state = await client.sentinel_master(MASTER)
        return int(state["config-epoch"])

    async def failover(self) -> PrivateRedis:
        """Have the Sentinels promote the replica (``SENTINEL FAILOVER``); the new primary."""
        old = await self.primary()
        async with _client(self.sentinels[0]) as client:
            await client.sentinel_failover(MASTER)
        return await self._promoted(old)

    async def kill_primary(self, *, replica_behind: float = 0.0) -> PrivateRedis:
        """SIGKILL the primary; the new primary once the Sentinels promoted the replica.

        ``replica_behind``: seconds the primary takes writes first while its replica is
        paused and cut off (its link closed, so that nothing waits for it in a socket), so
        that what the primary took meanwhile is lost with it.
        """
        old = await self.primary()
        replica = next(node for node in self.nodes if node is not old)
        if replica_behind:
            replica.pause()
            async with _client(old) as client:
                await client.client_kill_filter(_type="replica")
            await asyncio.sleep(replica_behind)
        await old.kill()
        replica.resume()
        return await self._promoted(old)

    async def _promoted(self, old: PrivateRedis) -> PrivateRedis:
        new = next(node for node in self.nodes if node is not old)

        async def everywhere() -> bool:
            named = [await self._named(s) for s in self.sentinels]
            return named == [new.port] * len(self.sentinels) and await _role(new) == "master"

        await self._until(everywhere, f"the Sentinels did not promote {new.url}")
        return new

    async def _watching(self) -> bool:
        """Every Sentinel sees the primary, its replica and the two other Sentinels."""
        for sentinel in self.sentinels:
            async with _client(sentinel) as client:
                state = await client.sentinel_master(MASTER)
            if (state["num-slaves"], state["num-other-sentinels"]) != (1, 2):
                return False
        return True

    async def _named(self, sentinel: PrivateRedis) -> int | None:
        async with _client(sentinel) as client:
            address = await client.sentinel_get_master_addr_by_name(MASTER)
        return int(address[1]) if address else None

    @staticmethod
    async def _until(done: Callable[[], Awaitable[bool]], failure: str) -> None:
        """Poll ``done`` (the Sentinels announce over pub/sub, not to a waiting command)."""
        try:
            async with asyncio.timeout(PROMOTION_TIMEOUT):
                while True:
                    with contextlib.suppress(RedisError, OSError):
                        if await done():
                            return
                    await asyncio.sleep(0.05)
        except TimeoutError as exc:
            raise AssertionError(f"{failure} within {PROMOTION_TIMEOUT:.0f} s") from exc


@contextlib.asynccontextmanager
async def _client(process: PrivateRedis) -> AsyncIterator[aioredis.Redis]:
    """A client of that very process (a node, a Sentinel), not of the gateway's Redis."""
    client = aioredis.Redis(port=process.port, socket_connect_timeout=1)
    try:
        yield client
    finally:
        await client.aclose()


async def _role(node: PrivateRedis) -> str | None:
    try:
        async with _client(node) as client:
            info = await client.info("replication")
    except (RedisError, OSError):
        return None
    return str(info.get("role"))


def _made(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
