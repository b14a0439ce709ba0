"""Log lines: one per record, whatever a message carries from outside."""

from __future__ import annotations

import json
import logging

import pytest
from redis.exceptions import RedisError

from queuegate.outage import BRIEF, OutageLog
from queuegate.redis_client import redis_for
from queuegate.runtime import configure_logging
from queuegate.settings import Settings

FORGED = "refused\n2026-12-03 19:00:00,000 ERROR workers.processor: FORGED\r\u2028\u2029\x85end"


@pytest.mark.parametrize("form", ["text", "json"])
def test_a_message_holding_line_breaks_is_one_line(
    form: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given logging configured as a process configures it
    configure_logging("INFO", form=form)  # type: ignore[arg-type]
    try:
        # When a message holding every kind of line break is logged (a tenant's header, say)
        logging.getLogger("workers.processor").warning("job %s", FORGED)
        err = capsys.readouterr().err
    finally:
        configure_logging("WARNING")

    # Expect one line, by any reader's idea of a line, that still says what was logged
    lines = err.splitlines()
    assert len(lines) == 1, lines
    if form == "json":
        assert json.loads(lines[0])["message"] == f"job {FORGED}"
    else:
        assert lines[0].endswith(
            "workers.processor: job refused\\n2026-12-03 19:00:00,000"
            " ERROR workers.processor: FORGED\\r\\u2028\\u2029\\x85end"
        )


CONTROLS = "".join(map(chr, [*range(0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029]))
"""Every character ``str.splitlines`` splits on, and every other control (ESC, NUL, DEL, C1)."""


def test_a_text_line_writes_out_every_control_character(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given human lines, as a process configures them
    configure_logging("INFO", form="text")
    try:
        # When a reply queue name a tenant chose holds every control character (a forged
        # record after a vertical tab, an escape sequence erasing the terminal's line, NUL)
        queue = f"q{CONTROLS}\x0bERROR FORGED\x1b[2K\x1b[1A\x00"
        logging.getLogger("workers.publisher").warning(
            "result of job %s returned: reply queue %s no longer exists", "j-1", queue
        )
        err = capsys.readouterr().err
    finally:
        configure_logging("WARNING")

    # Expect one line of printable text, by any reader's idea of a line, saying each one
    [line] = err.splitlines()
    assert line.isprintable(), line
    assert err == line + "\n"
    assert line.endswith(
        "reply queue q\\x00\\x01\\x02\\x03\\x04\\x05\\x06\\x07\\x08\\t\\n\\x0b\\x0c\\r"
        + "".join(f"\\x{code:02x}" for code in [*range(0x0E, 0x20), 0x7F, *range(0x80, 0xA0)])
        + "\\u2028\\u2029\\x0bERROR FORGED\\x1b[2K\\x1b[1A\\x00 no longer exists"
    )


@pytest.mark.parametrize("form", ["text", "json"])
def test_a_record_with_a_traceback_is_one_line(
    form: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given logging configured as a process configures it
    configure_logging("INFO", form=form)  # type: ignore[arg-type]
    try:
        # When a failure is logged with its traceback, and a line with the stack it came from
        try:
            raise ValueError(f"bad value {FORGED}")
        except ValueError:
            logging.getLogger("workers.processor").exception("job %s failed", "j-1")
        logging.getLogger("workers.processor").warning("here", stack_info=True)
        err = capsys.readouterr().err
    finally:
        configure_logging("WARNING")

    # Expect a line each, by any reader's idea of a line, holding the traceback and the stack
    lines = err.splitlines()
    assert len(lines) == 2, lines
    if form == "json":
        failed, here = (json.loads(line) for line in lines)
        assert failed["exception"].endswith(f"ValueError: bad value {FORGED}")
        assert "test_logs.py" in here["stack"]
    else:
        assert (
            "workers.processor: job j-1 failed\\nTraceback (most recent call last):\\n" in lines[0]
        )
        assert lines[0].endswith(
            "ValueError: bad value refused\\n2026-12-03 19:00:00,000 ERROR "
            "workers.processor: FORGED\\r\\u2028\\u2029\\x85end"
        )
        assert "workers.processor: here\\nStack (most recent call last):\\n" in lines[1]


async def test_an_outage_line_names_the_cause_without_the_clients_repr(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given Sentinels that know no primary: redis-py's error ends in its client's whole repr
    sentinels = Settings(redis_sentinels="127.0.0.1:1,127.0.0.1:2", redis_master_name="qgmissing")
    client = redis_for(sentinels, connect_timeout=0.5)
    outage = OutageLog(logging.getLogger("test.outage"), "Redis", "jobs wait")
    with caplog.at_level(logging.WARNING, logger="test.outage"):
        try:
            await client.ping()
        except RedisError as exc:
            outage.failed(exc)
        finally:
            await client.aclose()
    # Expect one short line naming the primary, no pool or connection dump
    [line] = [record.getMessage() for record in caplog.records]
    assert "qgmissing" in line and "ConnectionPool" not in line, line
    assert len(line) < BRIEF + 100, line
