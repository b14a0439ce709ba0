"""rich's ``Console``, leaving a closed stdout to the command's ending (``cli.main``): rich's
own handling of one ends the process with status 1."""

from __future__ import annotations

import errno
import os

from rich.console import Console


class PipedConsole(Console):
    def on_broken_pipe(self) -> None:
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))
