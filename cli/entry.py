"""The ``queuegate`` process's entry point: a serving role's stop signals handled before
anything else is imported.

Importing the CLI and a role takes a second or two, and a role hands SIGTERM and SIGINT to
its event loop only once it runs (``queuegate.runtime.stop_on_signals``): until then Python's
own handling would end the process silently (status 143), or with a KeyboardInterrupt
traceback. This module imports only the standard library, so the stop before serving that
a role documents (one line, status 0) holds from the process's first line of ours.

The handler writes its line and ends the process there and then (``os._exit``): nothing is
held yet (no job taken, no request accepted), and an exception raised into the main thread
mid-import, as a handler's only other way out, lands wherever the import was: it left modules
half made (``NameError`` inside asyncio), pydantic schemas half built, a C extension's
initialisation cut (SIGSEGV), or was swallowed by a library and the process served on.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from types import FrameType

SERVING = frozenset({"worker", "accounting", "api"})
"""The commands that serve until SIGTERM or Ctrl-C; the others keep Python's handling."""
UNTIL_STOPPED = SERVING | {"mock-provider", "demo"}
"""The commands that run until stopped: started without stdout, their output goes nowhere
and they serve on, where a one-shot command ends at its first output (``cli.main``)."""
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
LOGGER = "queuegate.runtime"
"""The logger whose line (``say_stopped_starting``) a stop in the event loop's start writes."""
NEVER_USED = ("opentelemetry.sdk.metrics",)
"""Modules a library imports whenever they are installed, which no queuegate process uses.

redis-py 8 imports OpenTelemetry's metrics SDK, when the ``otel`` extra is installed, to offer
Redis metrics of its own that queuegate never switches on (its metrics are Prometheus', its
OpenTelemetry only traces): 50 modules and 1.8 MB resident in every process, the worker's
included (measured 2026-12-04: an idle worker 83.4 -> 81.6 MB)."""


def main() -> None:
    leave_out_unused()
    if sys.argv[1:2] and sys.argv[1] in SERVING:
        for sig in STOP_SIGNALS:
            signal.signal(sig, _stopped_starting)
    from cli.main import main as run_command

    run_command()


def leave_out_unused() -> None:
    """Mark ``NEVER_USED`` missing before anything imports the libraries that would load it:
    they then go without, as where it is not installed. One a program imported before ours
    (an instrumenting wrapper's) is kept."""
    for name in NEVER_USED:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]


def _stopped_starting(signum: int, _: FrameType | None) -> None:
    line = stop_line(signal.Signals(signum), json_form=_json_logs())
    os.write(sys.stderr.fileno(), line.encode() + b"\n")
    os._exit(0)


def stop_line(sig: signal.Signals, *, json_form: bool) -> str:
    """The line ``say_stopped_starting`` logs, in the form the role's log lines take, written
    here without the logging machinery (whose locks the interrupted code may hold)."""
    message = f"{sig.name} while starting: stopped before serving"
    now = time.time()
    if json_form:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
        millis = int(now * 1000) % 1000
        return json.dumps(
            {
                "time": f"{stamp}.{millis:03d}+00:00",
                "level": "INFO",
                "logger": LOGGER,
                "message": message,
            },
            separators=(",", ":"),  # as orjson writes the role's other lines
        )
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
    return f"{stamp},{int(now * 1000) % 1000:03d} INFO {LOGGER}: {message}"


def _json_logs() -> bool:
    # The role's setting, as far as the environment says it (read before any settings are).
    return os.environ.get("QUEUEGATE_LOG_FORMAT", "").strip().lower() == "json"
