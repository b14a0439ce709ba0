"""Running async entry points: uvloop when available, signals turned into a stop event."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Literal, NoReturn, TypeVar

from queuegate.logs import BrokerRepeats, JsonFormatter, PoolRetries, TextFormatter

T = TypeVar("T")

log = logging.getLogger(__name__)


def run(main: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine on uvloop (the faster loop) when it is installed.

    SystemExit(0), as a normal stop ends, when SIGTERM or SIGINT stopped it while it was
    starting (see ``stop_on_signals``)."""
    try:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency on every platform
            return asyncio.run(_call(main))
        return uvloop.run(_call(main))
    except _StoppedStarting:
        raise SystemExit(0) from None


class _StoppedStarting(Exception):
    """A stop signal cancelled the process while it was starting (see ``stop_on_signals``)."""


_STOPPED_STARTING: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()
"""Tasks a stop signal cancelled while they were starting."""


async def _call(main: Callable[[], Awaitable[T]]) -> T:
    try:
        return await main()
    except asyncio.CancelledError:
        if asyncio.current_task() not in _STOPPED_STARTING:
            raise
        raise _StoppedStarting from None


YOUNG_COLLECTION = 5_000
"""Net allocations of tracked objects between collections of the youngest generation (700 by
default). At 20,000 the worker spent less still, but peaked a few MB higher with 5,000 jobs
held: garbage in cycles waits longer for its collection."""


def tune_gc() -> None:
    """Collect less often in a long-running service, and never look at its start-up objects.

    With Python's defaults a worker holding 5,000 jobs collected 800 times in a run of as many
    jobs, seven of them over every object it has (its modules' alone are about 60 MB), and
    spent 23 % of its CPU there (``gc.callbacks``), although its jobs leave only about 0.3
    objects each in reference cycles: nearly all of that work found nothing to free. Here the
    same run collects about 100 times, in 0.65-0.86 s of CPU instead of 2.2-2.3.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTION, 10, 10)


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT, so a component can drain instead of dying.

    Until something first waits for it (or says it is ``serving``), the process is starting
    (waiting for PostgreSQL, connecting): nothing would see the event set, and a start-up
    wait may last as long as an outage. A signal then cancels the task that asked for the
    event instead, and ``run`` ends as a normal stop does, saying so in one line: every
    start-up wait of every role ends at once, whatever it waits for. Should a second signal
    come before that stop has ended, the process dies of it, as it would without a handler:
    never ignored. Once serving, a signal only sets the event, saying so in one line.
    """
    stop = _Stop(asyncio.current_task())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.signalled, sig)
    return stop


def serving(stop: asyncio.Event) -> None:
    """The process is about to take work: from now on a stop signal sets ``stop`` for it to
    drain, where until now it cancelled the start (``stop_on_signals``). Call it before the
    first consumer starts: a start cancelled once consuming ended with its jobs taken and cut
    off mid-call (called again on redelivery, and counted against the provider's circuit)."""
    if isinstance(stop, _Stop):
        stop.serving()


async def until_set(timeout: float, *events: asyncio.Event) -> None:
    """Until one of ``events`` is set, or ``timeout`` seconds have passed."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


def exit_at_once(status: int = 0) -> NoReturn:
    """End the process with ``status`` now, its log and standard streams flushed, skipping
    Python's finalisation (atexit handlers, freeing every module, the event loop's tasks):
    for a process with nothing left to release, or whose releases wait on a service that
    does not answer."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def say_stopped_starting(sig: signal.Signals) -> None:
    """The one line of a process a stop signal ended before it served (here, or in the
    CLI's entry point before the event loop took the signals over)."""
    log.info("%s while starting: stopped before serving", sig.name)


def default_stop_signals() -> None:
    """SIGTERM and SIGINT handled as Python starts, which ends the CLI's stop before serving
    (``cli.entry``), for a server that takes them over itself: uvicorn, which puts back the
    handlers it found when it stops and raises the signal it got again."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


class _Stop(asyncio.Event):
    def __init__(self, starting: asyncio.Task[Any] | None) -> None:
        super().__init__()
        self._starting = starting
        self._stopping_start = False

    def serving(self) -> None:
        self._starting = None  # started: from now on the process drains on a signal

    async def wait(self) -> Literal[True]:
        self.serving()
        return await super().wait()

    def signalled(self, sig: signal.Signals) -> None:
        if self._stopping_start:
            # The first one's cancel has not ended the process (something swallowed it, or
            # left a task asyncio.run waits for): the operator asks again, so end it for sure.
            log.warning("%s again while stopping before serving: exiting at once", sig.name)
            signal.signal(sig, signal.SIG_DFL)
            signal.raise_signal(sig)
            return
        self.set()
        starting, self._starting = self._starting, None
        if starting is None or starting.done():
            log.info("%s: stopping", sig.name)
        else:
            say_stopped_starting(sig)
            _STOPPED_STARTING.add(starting)
            self._stopping_start = True
            starting.cancel()


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(
    level: str, *, libraries: int = logging.WARNING, form: Literal["text", "json"] = "text"
) -> None:
    """Our own log lines at ``level``; the broker and HTTP libraries only at ``libraries``;
    human lines, or one JSON object per line (``queuegate.logs``) with ``form="json"``.

    aio-pika logs every failed connect and reconnect at length; our lines say what matters,
    so one-shot commands silence it entirely and long-running ones keep its warnings.
    """
    logging.basicConfig(level=level.upper(), force=True)
    formatter = JsonFormatter() if form == "json" else TextFormatter(TEXT_FORMAT)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)
        handler.addFilter(BrokerRepeats())
    for name in ("aio_pika", "aiormq", "httpx"):
        logging.getLogger(name).setLevel(libraries)
    pool = logging.getLogger("asyncpg.pool")
    if not any(isinstance(f, PoolRetries) for f in pool.filters):
        pool.addFilter(PoolRetries())
