"""Components that reach a service through a TcpProxy, so a test can take that service away."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from queuegate.settings import Settings
from tests.proxy import TcpProxy

Service = Literal["amqp", "redis", "database"]

RECONNECT_INTERVAL = 0.3
"""Seconds between a robust connection's attempts (aio-pika's default is 5): tests stay short."""


@contextlib.asynccontextmanager
async def behind_proxies(
    settings: Settings, *services: Service
) -> AsyncIterator[tuple[Settings, dict[Service, TcpProxy]]]:
    """``settings`` with each named service's URL pointed at a proxy of its own, and the proxies.

    Give the returned settings to the components under test; the test itself keeps using the
    direct ``settings`` to read what happened, even while a proxy is down.
    """
    async with contextlib.AsyncExitStack() as stack:
        proxies: dict[Service, TcpProxy] = {}
        urls: dict[str, str] = {}
        for service in services:
            url = getattr(settings, f"{service}_url")
            proxy = proxies[service] = await stack.enter_async_context(TcpProxy(url))
            urls[f"{service}_url"] = proxy.url
        if "amqp_url" in urls:
            parts = urlsplit(urls["amqp_url"])
            query = f"{parts.query}&" if parts.query else ""
            urls["amqp_url"] = urlunsplit(
                parts._replace(query=f"{query}reconnect_interval={RECONNECT_INTERVAL}")
            )
        yield settings.model_copy(update=urls), proxies
