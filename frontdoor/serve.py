"""``queuegate api``: the front door served by uvicorn, in one process or N supervised ones.

    serve(settings, host="0.0.0.0", port=8080, processes=4, log_level="info")

Each process binds the port with ``SO_REUSEPORT``, so the kernel spreads connections over
them. It would spread them over any other server binding the port so too (another front
door, of this namespace or another): ``serve`` first makes sure nothing listens there, and
only the processes it starts itself skip that check (``joining``). Each process holds its
own broker connection and reply queue (``frontdoor.bridge``). With
``processes`` > 1 a ``queuegate.supervisor.Supervisor`` runs them, restarts one that dies,
and stops them all gracefully, as ``queuegate worker --processes`` does; they share their
metrics, so ``/metrics`` counts every process's requests whichever one answers. On SIGTERM or
SIGINT a process stops accepting, cuts the requests whose client has gone, gives the others
``shutdown_grace`` seconds from the signal on, closes within ``CLOSING`` seconds more, and
exits 0; a supervisor exits as soon as they have.
Each process bounds its connections, their headers and the time they take to send them
(``frontdoor.connections``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from types import FrameType
from typing import NoReturn

import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.config import STARTUP_FAILURE

from frontdoor.app import create_app
from frontdoor.connections import (
    ConnectionLimits,
    GuardedHttpToolsProtocol,
    fit_open_files,
    guarded_protocol,
)
from frontdoor.service import FrontDoor
from queuegate import listening, tracing
from queuegate.errors import ConfigError, GatewayError
from queuegate.runtime import default_stop_signals, run, tune_gc
from queuegate.settings import Settings, trusted_proxies
from queuegate.supervisor import supervise
from router import Catalog

log = logging.getLogger(__name__)

STARTUP_TIMEOUT = 10.0
CLOSING = 0.3
"""Seconds a front-door process takes at most, once its grace is over, to close (its
lifespan's shutdown: batch runner, broker bridge, Redis, PostgreSQL: 0.05-0.06 s measured
with a request cut); cut there, it exits as it would have, its connections dropped with it
(a batch it ran is taken over once its lease lapses)."""
SETTLE = 0.1
"""The pause uvicorn makes, once it stops accepting, before the grace it is given begins."""
GIVE_UP = 0.25
"""Seconds before the grace ends that the requests still waiting for their jobs are answered
(``FrontDoor.give_up``): 504 naming the job, not retried. Cut at the grace's end instead,
each was a bare text/plain 500, which the SDKs retried as a new job, called again."""


def serve(
    settings: Settings,
    *,
    host: str,
    port: int,
    processes: int,
    log_level: str,
    joining: bool = False,
) -> None:
    """``joining``: this process is one its supervisor started, which checked the port."""
    if not joining:
        check_free(host, port)
    if processes > 1:
        # Never returns: the process exits once its processes stopped.
        _supervise(settings, host=host, port=port, processes=processes, log_level=log_level)
    tracing.start("queuegate-frontdoor", heed_callers=settings.trace_heed_callers)
    app = create_app(settings)
    tune_gc()
    limits = ConnectionLimits.of(settings)
    limits = replace(limits, max_connections=fit_open_files(limits.max_connections))
    server = _Server(_config(app, settings, limits, log_level), give_up=lambda: _give_up(app))
    sock = bind(host, port)
    log.info("front door on http://%s:%d (docs at /docs)", host, sock.getsockname()[1])
    # uvicorn takes the stop signals from here (``_Server.handle_exit``), and asyncio's
    # Ctrl-C handling needs Python's to start
    default_stop_signals()
    try:
        run(lambda: server.serve(sockets=[sock]))
    except SystemExit as exc:
        # uvicorn's own status for a lifespan that failed (3): the CLI's for any failure
        # but a usage error is 1, what it says having been logged already
        if exc.code == STARTUP_FAILURE:
            raise SystemExit(1) from None
        raise


@contextlib.asynccontextmanager
async def serving(
    settings: Settings, catalog: Catalog, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """The front door served in this event loop (a free port by default), for tests and the
    demo; yields its root URL."""
    app = create_app(settings, catalog=catalog)
    server = _Server(_config(app, settings, ConnectionLimits.of(settings), "warning"))
    sock = bind(host, port)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(STARTUP_TIMEOUT):
            while not server.started:  # uvicorn announces no event for it
                if task.done():
                    task.result()
                await asyncio.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        sock.close()


class _Server(uvicorn.Server):
    """uvicorn, whose stop takes the grace from the signal on, then ``CLOSING`` at most, cuts
    the requests nobody waits for at once, and ends in status 0.

    uvicorn alone starts the grace up to 0.1 s after the signal (its loop looks for it every
    0.1 s) and then pauses 0.1 s more (``SETTLE``), and waits for the lifespan's shutdown
    however long it takes: a process stopped 0.35-0.45 s past its grace. It gives the grace
    to every request still running, those whose client went away included: a process with
    no connection left waited for their jobs (measured: 3.6 s after SIGTERM, for a chat or
    a stream whose client hung up on a job of 4 s; up to the whole grace), where an idle one
    stops in 0.15 s. And once stopped it raises the signal it got again, which ends the
    process of it (status 143, or 130 for Ctrl-C) where an operator's stop is a clean one."""

    def __init__(self, config: uvicorn.Config, give_up: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self._grace = config.timeout_graceful_shutdown or 0.0
        self._signalled: float | None = None
        self._give_up = give_up

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._signalled is None:
            self._signalled = time.monotonic()
        # uvicorn's own, but for noting the signal to raise again once stopped
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        protocol = self.config.http_protocol_class
        assert issubclass(protocol, GuardedHttpToolsProtocol)
        protocol.stop()
        if self._signalled is None:
            # A stop without a signal (``serving``: a test's or the demo's loop, which goes on
            # after it) closes whole, however long that takes: nothing would release what a
            # cut left open.
            await super().shutdown(sockets)
            return
        left = self._grace - (time.monotonic() - self._signalled)
        self.config.timeout_graceful_shutdown = max(left - SETTLE, 0.0)  # type: ignore[assignment]
        if self._give_up is not None:
            asyncio.get_running_loop().call_later(max(left - GIVE_UP, 0.0), self._give_up)
        try:
            async with asyncio.timeout(max(left, 0.0) + CLOSING):
                await super().shutdown(sockets)
        except TimeoutError:
            # Not raised on: uvicorn ends its serve as usual, raising the signal it got again.
            log.warning("closing took over %.1f s after the grace: exiting without it", CLOSING)


def _give_up(app: FastAPI) -> None:
    """Answer the requests still waiting for their jobs (``GIVE_UP``), if the door started."""
    door: FrontDoor | None = getattr(app.state, "frontdoor", None)
    if door is not None:
        door.bridge.give_up()


def _config(
    app: FastAPI, settings: Settings, limits: ConnectionLimits, log_level: str
) -> uvicorn.Config:
    """uvicorn as the front door runs it: httptools' parser with the limits of
    ``frontdoor.connections``, and no WebSocket upgrade (no route takes one, and an upgraded
    connection would leave those limits behind). Requests in progress at a stop get
    ``shutdown_grace`` to finish, in a process and in ``serving`` alike: without the bound
    uvicorn waits for each, a request held by a slow call for as long as the call takes.
    ``X-Forwarded-For`` is read by uvicorn's
    proxy-headers middleware, from ``QUEUEGATE_HTTP_TRUSTED_PROXIES`` only: uvicorn's own
    default trusts loopback (and reads ``FORWARDED_ALLOW_IPS``), so any client able to connect
    from there could name whatever address it liked; none trusted, the middleware is off."""
    proxies = trusted_proxies(settings.http_trusted_proxies)
    return uvicorn.Config(
        _said_in_one_line(app),
        http=guarded_protocol(limits, app.state.held),
        ws="none",
        proxy_headers=bool(proxies),
        forwarded_allow_ips=proxies,
        log_config=None,
        log_level=log_level,
        access_log=False,
        lifespan="on",
        # As given, a fraction too (int() made 0.5 s no grace at all): uvicorn declares an
        # int but only hands it to asyncio.timeout, which takes any number of seconds.
        timeout_graceful_shutdown=settings.shutdown_grace,  # type: ignore[arg-type]
    )


def _said_in_one_line(app: FastAPI) -> ASGIApp:
    """``app``, whose start failed for a service's reason (a ``GatewayError``: PostgreSQL
    unreachable, or refusing the credentials) uvicorn logs as that error's one line, which
    says what to do, instead of the traceback starlette sends it (5 KB in one log line)."""

    async def said(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            return await app(scope, receive, send)

        async def send_said(message: Message) -> None:
            failure = sys.exception()  # starlette sends the failure from its except block
            if message["type"] == "lifespan.startup.failed" and isinstance(failure, GatewayError):
                message = {**message, "message": str(failure)}
            await send(message)

        await app(scope, receive, send_said)

    return said


def bind(host: str, port: int) -> socket.socket:
    """A listening socket that other front-door processes may bind too (``SO_REUSEPORT``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(cannot_listen(host, port, exc)) from exc
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def check_free(host: str, port: int) -> None:
    """ConfigError unless nothing listens on ``host:port``: a socket bound without
    ``SO_REUSEPORT`` is refused any port a listening socket holds, whoever bound it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # A port left in TIME_WAIT by a front door that stopped is free to serve again.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(cannot_listen(host, port, exc)) from exc


def cannot_listen(host: str, port: int, exc: OSError) -> str:
    """Why the front door cannot listen on ``host:port``, in one line saying what to do."""
    return listening.cannot_listen(
        "the front door", host, port, exc, host_is="--host", port_is="--port"
    )


def _supervise(
    settings: Settings, *, host: str, port: int, processes: int, log_level: str
) -> NoReturn:
    argv = [sys.executable, "-m", "cli", "api", "--host", host, "--port", str(port)]
    argv += ["--log-level", log_level, "--joining"]

    def command(slot: int) -> tuple[list[str], dict[str, str]]:
        return argv, dict(os.environ)

    supervise(command, processes=processes, grace=settings.shutdown_grace, shared_metrics=True)


__all__ = ["bind", "check_free", "serve", "serving"]
