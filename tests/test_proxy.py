"""The outage proxy itself: it forwards, cuts, refuses while down, and serves again after."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from queuegate.settings import Settings
from tests.proxy import TcpProxy


async def test_proxy_forwards_cuts_and_comes_back(settings: Settings) -> None:
    async with TcpProxy(settings.redis_url) as proxy:
        client = aioredis.from_url(proxy.url, socket_connect_timeout=1)
        try:
            assert await client.ping()
            await proxy.down()
            with pytest.raises(RedisConnectionError):
                await client.ping()
            await proxy.up()
            assert await client.ping()
        finally:
            await client.aclose()
