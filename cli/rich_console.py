"""rich's ``Console``, leaving a closed stdout to the command's ending (``cli.main``): rich's
own handling of one ends the process with status 1."""

from __future__ import annotations

import errno
import os
import sys

from rich.console import Console

from cli.console import to_devnull


class PipedConsole(Console):
    def on_broken_pipe(self) -> None:
        if self.stderr:
            # Notes and progress, not the command's output: they go nowhere from here, every
            # later one too, and its work goes on (a collect into its file acknowledges what
            # it wrote, a submit publishes the rest).
            to_devnull(sys.stderr)
            return
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))
