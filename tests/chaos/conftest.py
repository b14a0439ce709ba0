"""Chaos scenarios print their figures as they finish and again, together, at the end (from
their reports, which xdist's workers hand back); the scenarios that restart or fault a RabbitMQ
node share one private node (one per xdist worker)."""

from __future__ import annotations

from collections.abc import Generator, Iterator

import pytest

from tests.chaos.harness import FIGURES, FIGURES_PROPERTY
from tests.chaos.private_broker import PrivateBroker


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    call: pytest.CallInfo[None],
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """The figures the test recorded, on its report (tests/conftest.py prints them)."""
    report = yield
    if call.when == "call":
        report.user_properties.extend((FIGURES_PROPERTY, f.line()) for f in FIGURES)
        FIGURES.clear()
    return report


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateBroker]:
    """One private node for every chaos module that needs one: booting and stopping one costs
    about 9 s. Each test still has its own namespace on it (queues, reply queues, users), and
    a test that faults the node (restart, memory alarm) leaves it serving again."""
    with PrivateBroker(tmp_path_factory.mktemp("rabbitmq")) as node:
        yield node
