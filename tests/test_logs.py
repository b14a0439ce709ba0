"""Log lines: one per record, whatever a message carries from outside."""

from __future__ import annotations

import json
import logging

import pytest

from queuegate.runtime import configure_logging

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
