"""The HTTP front door in the test's event loop, on a free port, before a running gateway."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import uvicorn

from frontdoor import create_app
from frontdoor.serve import bind
from queuegate.db import create_pool
from queuegate.settings import Settings
from queuegate.tenancy import add_api_key
from router import Catalog


@dataclass(frozen=True)
class FrontDoorUrl:
    url: str
    """The root, e.g. ``http://127.0.0.1:PORT``; the OpenAI SDK's base_url is ``url + "/v1"``."""

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"


@contextlib.asynccontextmanager
async def running_frontdoor(settings: Settings, catalog: Catalog) -> AsyncIterator[FrontDoorUrl]:
    app = create_app(settings, catalog=catalog)
    server = uvicorn.Server(
        uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", log_level="warning")
    )
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(10):
            while not server.started:  # uvicorn announces no event for it
                if task.done():
                    task.result()
                await asyncio.sleep(0.01)
        yield FrontDoorUrl(f"http://127.0.0.1:{port}")
    finally:
        server.should_exit = True
        await task
        sock.close()


async def issue_key(settings: Settings, team: str) -> str:
    """A new API key of ``team`` (the schema must be migrated)."""
    pool = await create_pool(settings)
    try:
        _, key = await add_api_key(pool, team)
    finally:
        await pool.close()
    return key
