"""Progress of long-running commands: a rich bar on a terminal, plain periodic lines otherwise."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

Update = Callable[[int, int], None]
"""Called with (done, total)."""


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:,.0f}/s" if task.speed else "", style="progress.data.speed")


@contextlib.contextmanager
def progress(console: Console, label: str, *, every: float = 5.0) -> Iterator[Update]:
    """An update function that shows count, rate and ETA; plain lines every ``every`` s
    when the console is not a terminal (logs, CI, pipes)."""
    if console.is_terminal:
        columns = (
            TextColumn(label),
            BarColumn(),
            MofNCompleteColumn(),
            _RateColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=console) as bar:
            task = bar.add_task(label, total=None)
            started = False

            def update(done: int, total: int) -> None:
                nonlocal started
                if not started:
                    # A resumed command starts past 0: its rate counts from there.
                    bar.reset(task, completed=done, total=total)
                    started = True
                bar.update(task, completed=done, total=total)

            yield update
        return
    lines = _Lines(console, label, every)
    yield lines.update
    lines.flush()


class _Lines:
    def __init__(self, console: Console, label: str, every: float) -> None:
        self._console = console
        self._label = label
        self._every = every
        self._start = time.monotonic()
        self._printed = float("-inf")
        self._last: tuple[int, int] | None = None
        self._shown: tuple[int, int] | None = None
        self._base: int | None = None
        """What was done before this run (a resumed command): not part of its rate."""

    def update(self, done: int, total: int) -> None:
        if self._base is None:
            self._base, self._start = done, time.monotonic()
        self._last = (done, total)
        now = time.monotonic()
        finished = done >= total and self._last != self._shown
        if finished or now - self._printed >= self._every:
            self._print(now)

    def flush(self) -> None:
        if self._last != self._shown:
            self._print(time.monotonic())

    def _print(self, now: float) -> None:
        assert self._last is not None
        done, total = self._last
        elapsed = max(now - self._start, 1e-9)
        rate = (done - (self._base or 0)) / elapsed
        eta = f", ETA {(total - done) / rate:,.0f} s" if rate and done < total else ""
        percent = 100 * done / total if total else 100.0
        self._console.print(
            f"{self._label}: {done:,}/{total:,} ({percent:.0f}%), {rate:,.0f}/s{eta}",
            highlight=False,
        )
        self._printed = now
        self._shown = self._last
