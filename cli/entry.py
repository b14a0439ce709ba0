"""The ``queuegate`` process's entry point: a serving role's stop signals handled before
anything else is imported.

Importing the CLI and a role takes a second or two, and a role hands SIGTERM and SIGINT to
its event loop only once it runs (``queuegate.runtime.stop_on_signals``): until then Python's
own handling would end the process silently (status 143), or with a KeyboardInterrupt
traceback. This module imports only the standard library, so the stop before serving that
a role documents (one line, status 0) holds from the process's first line of ours.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

SERVING = frozenset({"worker", "accounting", "api"})
"""The commands that serve until SIGTERM or Ctrl-C; the others keep Python's handling."""
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StoppedStarting(SystemExit):
    """A stop signal came before the role took the stop signals over. A SystemExit, so that
    asyncio and the libraries it passes through let it by, as they do an exit."""

    def __init__(self, sig: signal.Signals) -> None:
        super().__init__(0)
        self.signal = sig


def main() -> None:
    if sys.argv[1:2] and sys.argv[1] in SERVING:
        for sig in STOP_SIGNALS:
            signal.signal(sig, _stopped_starting)
    try:
        from cli.main import main as run_command

        run_command()
    except StoppedStarting as stopped:
        import logging

        from queuegate.runtime import configure_logging, say_stopped_starting

        if not logging.getLogger("queuegate").isEnabledFor(logging.INFO):
            # Stopped before the role set its log level up (the CLI's own is warning): the
            # line still says why the process ended.
            configure_logging("info")
        say_stopped_starting(stopped.signal)
        raise SystemExit(0) from None


def _stopped_starting(signum: int, _: FrameType | None) -> None:
    # A second signal ends the process at once, should the stop itself hang.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    raise StoppedStarting(signal.Signals(signum))
