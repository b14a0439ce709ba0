"""The helper process that scans large texts for a worker (see ``workers.pii.offload``).

    python -m workers.pii.helper   # reads texts on stdin, writes findings on stdout

Each text arrives as one message (its length, then its UTF-8 bytes) and is answered with one
message of (start, end, family) triples; the helper exits when its input closes.
"""

from __future__ import annotations

import os
import sys

from workers.pii.offload import receive, send, spans

NICENESS = 10
"""How much lower the helper's CPU priority is than the worker's: when cores are short, the
jobs' own work goes first and the large scan waits."""


def main() -> None:
    os.nice(NICENESS)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while (payload := receive(stdin)) is not None:
        send(stdout, spans(payload.decode("utf-8", "surrogatepass")).tobytes())


if __name__ == "__main__":
    main()
