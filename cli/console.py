"""Where the commands print: stdout for results, stderr for notes and errors."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from rich.console import Console, RenderableType


class LazyConsole:
    """A rich ``Console``, made when first printed to: every process imports the CLI, and a
    worker, which prints nothing through it, then never imports rich (54 modules, 1.7 MB
    resident). Its ``console`` where a ``Console`` is passed on."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._console: Console | None = None

    @property
    def console(self) -> Console:
        if self._console is None:
            from cli.rich_console import PipedConsole

            self._console = PipedConsole(**self._options)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.console, name)


out = LazyConsole(soft_wrap=True)  # lines stay whole (for grep and logs); tables still fit
err = LazyConsole(stderr=True, soft_wrap=True)


def print_table(renderable: RenderableType, *, wide: bool) -> None:
    """Tables fit 80 columns; a --wide one is printed as wide as it needs, so a narrower
    terminal wraps its lines rather than cutting them (and a pipe gets them whole)."""
    if wide:
        from rich.measure import Measurement

        from cli.rich_console import PipedConsole

        console = out.console
        needed = Measurement.get(console, console.options.update_width(10_000), renderable).maximum
        # print(width=) never exceeds the console's own width: a console as wide as needed.
        PipedConsole(width=max(console.width, needed), soft_wrap=True).print(renderable)
    else:
        out.print(renderable)


def to_devnull(stream: TextIO) -> None:
    """``stream``'s descriptor sent to /dev/null once its reader is gone: what it still
    buffers, flushed later or as Python exits, then goes nowhere rather than fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
    os.close(devnull)
