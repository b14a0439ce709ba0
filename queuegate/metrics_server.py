"""A tiny HTTP server for ``/metrics``, ``/healthz`` and ``/readyz``, in the process's loop.

prometheus_client's own server runs in a thread and cannot ask the event loop whether the
component is consuming; this one answers from the loop itself::

    async with MetricsServer(
        settings.metrics_host, settings.metrics_port_of("worker"), worker.is_ready
    ):
        await worker.run(stop)

``/healthz`` answers 200 while the loop runs (the process is alive and not wedged);
``/readyz`` answers 200 only while ``ready()`` is true (connected and consuming).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Self

from prometheus_client import CONTENT_TYPE_LATEST

from queuegate.errors import ConfigError
from queuegate.listening import cannot_listen
from queuegate.metrics import exposition

log = logging.getLogger(__name__)

READ_TIMEOUT = 5.0
"""Seconds a client gets to send its request line and headers."""


class MetricsServer:
    def __init__(self, host: str, port: int, ready: Callable[[], bool]) -> None:
        self._host = host
        self._port = port
        self._ready = ready
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The bound port (the chosen one when constructed with port 0)."""
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def __aenter__(self) -> Self:
        try:
            self._server = await asyncio.start_server(self._handle, self._host, self._port)
        except OSError as exc:
            raise ConfigError(
                cannot_listen(
                    "metrics",
                    self._host,
                    self._port,
                    exc,
                    host_is="QUEUEGATE_METRICS_HOST",
                    port_is="QUEUEGATE_METRICS_PORT",
                )
            ) from exc
        log.info("metrics, /healthz and /readyz on http://%s:%d", self._host, self.port)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                request = await reader.readline()
                while (await reader.readline()).strip():
                    pass
            parts = request.decode("latin-1").split()
            path = parts[1].split("?", 1)[0] if len(parts) >= 2 else ""
            writer.write(self._respond(path))
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _respond(self, path: str) -> bytes:
        if path == "/metrics":
            return _response(200, exposition(), CONTENT_TYPE_LATEST)
        if path == "/healthz":
            return _response(200, b"ok\n")
        if path == "/readyz":
            if self._ready():
                return _response(200, b"ready\n")
            return _response(503, b"not ready\n")
        return _response(404, b"not found: try /metrics, /healthz or /readyz\n")


def _response(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body
