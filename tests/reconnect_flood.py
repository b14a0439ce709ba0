"""A reconnect flood on a front door, from its own process as an attacker's would be (in the
test's event loop it would starve the front door it attacks):

    python -m tests.reconnect_flood HOST PORT KEY CONNECTIONS

``CONNECTIONS`` clients each keep ``AHEAD`` GETs of /v1/models with ``KEY`` pipelined,
topping them up as answers come, and connect again at once whenever their connection is
closed (made room for, or answered 503). Prints ``flooding`` once each has had an answer,
then runs until killed.
"""

from __future__ import annotations

import asyncio
import sys

AHEAD = 6
"""Requests a connection keeps pipelined ahead of their answers (under the cut-off)."""


async def keep_pipelining(
    host: str, port: int, key: str, answered: asyncio.Queue[None], *, reopen: bool = True
) -> None:
    """A connection of ``key``'s that always keeps ``AHEAD`` GETs of /v1/models pipelined,
    topping them up as answers come (the first one told to ``answered``), and opens again at
    once whenever it is closed or refused (unless not to ``reopen``)."""
    request = f"GET /v1/models HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {key}\r\n\r\n"
    first = True
    opening = True
    while opening:
        opening = reopen
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            if reopen:
                continue
            raise
        try:
            writer.write(request.encode() * AHEAD)
            while answers := await reader.read(65536):
                if first:
                    answered.put_nowait(None)
                    first = False
                writer.write(request.encode() * answers.count(b"HTTP/1.1 "))
        except ConnectionError:
            pass
        finally:
            writer.close()


async def main(host: str, port: int, key: str, connections: int) -> None:
    answered: asyncio.Queue[None] = asyncio.Queue()
    flood = [
        asyncio.create_task(keep_pipelining(host, port, key, answered)) for _ in range(connections)
    ]
    for _ in flood:
        await answered.get()
    print("flooding", flush=True)
    await asyncio.gather(*flood)


if __name__ == "__main__":
    host, port, key, connections = sys.argv[1:]
    asyncio.run(main(host, int(port), key, int(connections)))
