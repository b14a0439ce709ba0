"""Where the commands print: stdout for results, stderr for notes and errors."""

from __future__ import annotations

from rich.console import Console, RenderableType
from rich.measure import Measurement

out = Console(soft_wrap=True)  # lines stay whole (for grep and logs); tables still fit
err = Console(stderr=True, soft_wrap=True)


def print_table(renderable: RenderableType, *, wide: bool) -> None:
    """Tables fit 80 columns; a --wide one is printed as wide as it needs, so a narrower
    terminal wraps its lines rather than cutting them (and a pipe gets them whole)."""
    if wide:
        needed = Measurement.get(out, out.options.update_width(10_000), renderable).maximum
        # print(width=) never exceeds the console's own width: a console as wide as needed.
        Console(width=max(out.width, needed), soft_wrap=True).print(renderable)
    else:
        out.print(renderable)
