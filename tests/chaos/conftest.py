"""Chaos scenarios print their figures as they finish and again, together, at the end; the
scenarios that restart or fault a RabbitMQ node share one private node."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.chaos.harness import FIGURES
from tests.chaos.private_broker import PrivateBroker


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section("chaos figures")
        for figures in FIGURES:
            terminalreporter.write_line(figures.line())


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateBroker]:
    """One private node for every chaos module that needs one: booting and stopping one costs
    about 9 s. Each test still has its own namespace on it (queues, reply queues, users), and
    a test that faults the node (restart, memory alarm) leaves it serving again."""
    with PrivateBroker(tmp_path_factory.mktemp("rabbitmq")) as node:
        yield node
