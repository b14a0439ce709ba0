"""Chaos scenarios print their figures as they finish and again, together, at the end."""

from __future__ import annotations

import pytest

from tests.chaos.harness import FIGURES


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section("chaos figures")
        for figures in FIGURES:
            terminalreporter.write_line(figures.line())
