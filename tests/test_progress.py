"""Progress of long commands when nobody watches a terminal: plain lines, not a bar."""

from __future__ import annotations

import io

from rich.console import Console

from queuegate.progress import progress


def test_without_a_terminal_progress_is_plain_periodic_lines() -> None:
    # Given a console writing to a file, not a terminal
    sink = io.StringIO()
    console = Console(file=sink, width=200)

    # When a command advances in three steps within one reporting period
    with progress(console, "published", every=3600) as update:
        update(1, 10)
        update(5, 10)
        update(10, 10)

    # Expect the first step and the end, each a line with count, percent and rate
    lines = sink.getvalue().splitlines()
    heads = [line.split(",")[0] for line in lines]
    assert heads == ["published: 1/10 (10%)", "published: 10/10 (100%)"]
    assert all("/s" in line for line in lines)
    assert "\x1b" not in sink.getvalue()


def test_a_resumed_command_counts_its_rate_from_where_it_resumed() -> None:
    # Given a command resuming with 9,000 of 10,000 done by an earlier run
    sink = io.StringIO()
    with progress(Console(file=sink, width=200), "collected", every=3600) as update:
        # When it reports where it starts
        update(9000, 10000)

    # Expect no rate yet: what the earlier run did is not this run's speed
    [line] = sink.getvalue().splitlines()
    assert line == "collected: 9,000/10,000 (90%), 0/s"
