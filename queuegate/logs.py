"""Log lines a machine can read: one JSON object per line (``QUEUEGATE_LOG_FORMAT=json``).

Each object holds ``time`` (UTC, ISO 8601), ``level``, ``logger`` and ``message``, then,
when the line was logged for a job, its ``job_id`` and ``team`` (``for_job``), and, while a
span is current, its ``trace_id`` and ``span_id`` (``queuegate.tracing``); ``exception``
holds a traceback. The message is the same text a human line carries, so whatever is kept
out of log lines (keys scrubbed from provider errors, passwords from URLs) is kept out here.
``queuegate.runtime.configure_logging`` installs it.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from contextvars import ContextVar
from datetime import UTC, datetime

from queuegate import tracing
from queuegate.json_lines import one_line
from queuegate.visible import clipped, visible

_JOB: ContextVar[tuple[str, str] | None] = ContextVar("queuegate_job", default=None)


def for_job(job_id: str, team: str) -> None:
    """Lines logged from now on in this task (and the tasks it starts) are about this job.

    A worker runs each delivery in a task of its own, whose context ends with it."""
    _JOB.set((clipped(job_id), team))


class TextFormatter(logging.Formatter):
    """Human lines, one per record: a traceback or stack after the message is on its line, its
    line breaks escaped as a message's are (as the JSON form's ``exception`` holds it), so a
    reader that takes a line for a record (a log shipper, ``grep``) gets the whole of it.

    Every control character of the line is written out (``visible``: ``\\n``, ``\\x1b``,
    ``\\u2028``): a message carries text from outside (a tenant's header or queue name, a
    provider's text), and raw, a line break in it (VT, FF, FS and NEL too, for
    ``str.splitlines``) would forge a record, an escape sequence rewrite the operator's
    terminal, and a NUL make ``grep`` take the log for binary."""

    def format(self, record: logging.LogRecord) -> str:
        return visible(super().format(record))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        job = _JOB.get()
        if job is not None:
            line["job_id"], line["team"] = job
        if tracing.ON:
            ids = tracing.ids()
            if ids is not None:
                line["trace_id"] = ids[0]
                if ids[1] is not None:
                    line["span_id"] = ids[1]
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return one_line(line).decode()


OUTAGE_GAP = 150.0
"""Seconds without a failed reconnect after which the next starts a new outage: asyncpg
retries at 1, 2, 4... s up to 60, each after a connect that may take its own timeout."""


class PoolRetries(logging.Filter):
    """One line per PostgreSQL outage where asyncpg's pool logs five or more.

    The pool logs every failed attempt to restore its floor of connections with a 28-line
    traceback, in every process that holds one. The first failure passes as one line with
    its cause (no URL: asyncpg names host and port only); those that follow it within
    ``OUTAGE_GAP`` are dropped. ``queuegate.runtime.configure_logging`` installs it.
    """

    def __init__(self) -> None:
        super().__init__()
        self._last = -math.inf

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith("Failed to restore the pool connection floor"):
            return True
        first = record.created - self._last > OUTAGE_GAP
        self._last = record.created
        if first:
            cause = record.exc_info[1] if record.exc_info else None
            record.msg = (
                "PostgreSQL connections lost (%s): the pool reconnects in the background, "
                "retrying at most every 60 s; no more lines until it has been quiet for %.0f s"
            )
            record.args = (f"{type(cause).__name__}: {cause}", OUTAGE_GAP)
            record.exc_info, record.exc_text = None, None
        return first


REPEAT_GAP = 60.0
"""Seconds in which a line of the broker libraries is not written again (``BrokerRepeats``)."""
_REPEATS_KEPT = 1024
"""Kinds of line ``BrokerRepeats`` remembers: their messages are templates, a few dozen."""


class BrokerRepeats(logging.Filter):
    """One line a minute of each kind the broker libraries (aio-pika, aiormq) write.

    They log each connection's loss at length: a warning with a 20-line traceback, then an
    error per channel of the connection. A worker holds a connection per team, so teams whose
    connections kept closing wrote thousands of lines a minute (34 such teams: 7,079 lines in
    20 s), burying the worker's own; its reconnects are counted per connection and team in
    ``queuegate_broker_reconnects``. The first line of each kind (its logger and message
    template) passes as one line with its cause; the same kind within ``REPEAT_GAP`` is left
    out, counted on the next one let through. ``configure_logging`` installs it on the
    handlers: a logger's own filters never see its children's lines.
    """

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[tuple[str, object], float] = {}
        self._left_out: Counter[tuple[str, object]] = Counter()

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(("aio_pika", "aiormq")):
            return True
        kind = (record.name, record.msg)
        if record.created - self._last.get(kind, -math.inf) < REPEAT_GAP:
            self._left_out[kind] += 1
            return False
        if len(self._last) >= _REPEATS_KEPT:
            self._last.clear()
        self._last[kind] = record.created
        line = record.getMessage()
        cause = record.exc_info[1] if record.exc_info else None
        if cause is not None:
            line += f" ({type(cause).__name__}: {cause})"
        left_out = self._left_out.pop(kind, 0)
        if left_out:
            line += f" [{left_out} more like it left out in the last {REPEAT_GAP:.0f} s or more]"
        record.msg, record.args = line, None
        record.exc_info, record.exc_text = None, None
        return True
