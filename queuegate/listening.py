"""Why a server cannot listen on a host and port, in one line saying what to set: the front
door's (``--host``, ``--port``) and the metrics server's (``QUEUEGATE_METRICS_HOST``,
``QUEUEGATE_METRICS_PORT``)."""

from __future__ import annotations

import errno
import socket

from queuegate.visible import clipped


def cannot_listen(
    serving: str, host: str, port: int, exc: OSError, *, host_is: str, port_is: str
) -> str:
    """Why ``serving`` cannot listen on ``host:port`` (``exc``), naming what to set: only a
    port in use is another process's doing; a host that does not resolve, or is not one of
    this machine's addresses, is the host's (the host is clipped: an operator typed it)."""
    where = f"cannot serve {serving} on {clipped(host)}:{port}"
    if exc.errno == errno.EADDRINUSE:
        # Not its strerror: uvloop's repeats the address, at length.
        return f"{where}: another process listens there; set {port_is} to a free port"
    if isinstance(exc, socket.gaierror):
        return f"{where}: the host does not resolve; set {host_is} to an address of this machine"
    if exc.errno == errno.EADDRNOTAVAIL:
        return (
            f"{where}: no interface of this machine has that address; set {host_is} to one it has"
        )
    return f"{where} ({exc.strerror}): pick another {host_is} or {port_is}"


__all__ = ["cannot_listen"]
