"""Running async entry points: uvloop when available, signals turned into a stop event."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def run(main: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine on uvloop (the faster loop) when it is installed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every platform we ship
        return asyncio.run(_call(main))
    return uvloop.run(_call(main))


async def _call(main: Callable[[], Awaitable[T]]) -> T:
    return await main()


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT, so a component can drain instead of dying."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def configure_logging(level: str, *, libraries: int = logging.WARNING) -> None:
    """Our own log lines at ``level``; the broker and HTTP libraries only at ``libraries``.

    aio-pika logs every failed connect and reconnect at length; our lines say what matters,
    so one-shot commands silence it entirely and long-running ones keep its warnings.
    """
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    for name in ("aio_pika", "aiormq", "httpx"):
        logging.getLogger(name).setLevel(libraries)
