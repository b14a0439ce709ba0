"""Runs N copies of a command (worker processes) and keeps them running until told to stop.

    supervise(argv_of, processes=4, grace=30)  # until SIGTERM or SIGINT, then exits

or, inside an event loop of one's own (a test's)::

    await Supervisor(argv_of, processes=4, grace=30).run(stop)

A process that exits on its own is started again after a backoff that doubles while it keeps
crashing soon after start (so a broken config does not spin) and resets once it has run for
a while. One that exits with ``StartRefused.status`` (it cannot start as configured, and
said why) at the first start of its slot would fail the same way again: every other process
is stopped as below, and ``supervise`` exits 1. Started again in a slot whose process ran,
the same refusal is a moment's (its metrics port grabbed while it was down): restarted as a
crash is. On stop every process gets SIGTERM and ``grace`` seconds (plus a
margin) to drain; one still running then gets SIGKILL, and the broker requeues what it held.

With ``shared_metrics`` the processes share one Prometheus registry (they share one port, so
a scrape reaches any of them): each is started with ``PROMETHEUS_MULTIPROC_DIR`` set to a
directory private to this supervisor, a process's live gauges are dropped when it ends
(``mark_process_dead``), and the directory is deleted when the supervisor returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import NoReturn

from prometheus_client.multiprocess import mark_process_dead

from queuegate.errors import StartRefused
from queuegate.metrics import MULTIPROCESS_DIR
from queuegate.runtime import exit_at_once, run, stop_on_signals, until_set

log = logging.getLogger(__name__)

BACKOFF_FIRST = 0.5
BACKOFF_CAP = 30.0
STABLE_AFTER = 30.0
"""Seconds after which a process counts as having started fine: its next crash restarts fast."""
KILL_MARGIN = 10.0
"""Seconds beyond the drain grace before a process that will not stop is killed."""


Command = Callable[[int], tuple[Sequence[str], Mapping[str, str]]]
"""``command(slot)``: the argv and environment of the process in ``slot``."""


def supervise(
    command: Command, *, processes: int, grace: float, shared_metrics: bool = False
) -> NoReturn:
    """Run a ``Supervisor`` until SIGTERM or SIGINT has stopped every process, then end this
    one at once, status 0 (``exit_at_once``), 1 when a process refused to start: with its
    processes stopped it holds nothing, and Python's own finalisation of it (freeing the
    modules the CLI imported) took 0.11-0.27 s more for the worker's, 0.8-1.3 s under load
    for the front door's."""

    async def until_stopped() -> bool:
        stop = stop_on_signals()
        supervisor = Supervisor(
            command, processes=processes, grace=grace, shared_metrics=shared_metrics
        )
        await supervisor.run(stop)
        return supervisor.refused

    refused = run(until_stopped)
    exit_at_once(1 if refused else 0)


class Supervisor:
    def __init__(
        self,
        command: Command,
        *,
        processes: int,
        grace: float,
        shared_metrics: bool = False,
    ) -> None:
        self._command = command
        self._processes = processes
        self._grace = grace
        self._shared_metrics = shared_metrics
        self.restarts = 0
        self.refused = False
        """Whether a process refused to start (``StartRefused``), which stopped them all."""

    async def run(self, stop: asyncio.Event) -> None:
        with contextlib.ExitStack() as stack:
            metrics_dir = None
            if self._shared_metrics:
                metrics_dir = stack.enter_context(
                    tempfile.TemporaryDirectory(prefix="queuegate-metrics-")
                )
            await asyncio.gather(
                *(self._keep(slot, stop, metrics_dir) for slot in range(self._processes))
            )
        log.info("all %d processes stopped", self._processes)

    async def _keep(self, slot: int, stop: asyncio.Event, metrics_dir: str | None) -> None:
        delay = BACKOFF_FIRST
        first = True
        while not stop.is_set():
            argv, given = self._command(slot)
            env = dict(given)
            if metrics_dir is not None:
                env[MULTIPROCESS_DIR] = metrics_dir
            process = await asyncio.create_subprocess_exec(*argv, env=env)
            started = time.monotonic()
            log.info("process %d started (pid %d)", slot, process.pid)
            exited = asyncio.create_task(process.wait())
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set():
                stopping.cancel()
                await self._terminate(slot, process, exited)
                _forget(process.pid, metrics_dir)
                return
            stopping.cancel()
            code = exited.result()
            _forget(process.pid, metrics_dir)
            if code == StartRefused.status and first:
                # Its one line said why and what to do: said again at each restart, it only
                # scrolled away while the command looked alive.
                log.info("process %d cannot start as configured: stopping all", slot)
                self.refused = True
                stop.set()
                return
            first = False
            if time.monotonic() - started > STABLE_AFTER:
                delay = BACKOFF_FIRST
            log.warning(
                "process %d (pid %d) exited with %s; restarting in %.1f s",
                slot,
                process.pid,
                _describe(code),
                delay,
            )
            self.restarts += 1
            await until_set(delay, stop)
            delay = min(delay * 2, BACKOFF_CAP)

    async def _terminate(
        self, slot: int, process: asyncio.subprocess.Process, exited: asyncio.Task[int]
    ) -> None:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(self._grace + KILL_MARGIN):
                code = await exited
        except TimeoutError:
            log.error("process %d (pid %d) did not stop in time; killing it", slot, process.pid)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            code = await exited
        log.info("process %d (pid %d) stopped: %s", slot, process.pid, _describe(code))


def _forget(pid: int, metrics_dir: str | None) -> None:
    """Drop the live gauges of an ended process; its counters stay in the sums."""
    if metrics_dir is not None:
        mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]


def _describe(code: int) -> str:
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"status {code}"
