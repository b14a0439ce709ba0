"""Running the HTTP APIs' batches to their end, whatever stops in between.

Who runs a batch: every front-door process runs a ``BatchRunner`` beside its routes. A
batch created over HTTP is a row in PostgreSQL (``frontdoor.batches.records``) with its
input in a stored file; a runner takes the oldest batch left to run under a lease, and
drives it through the batch pipeline every batch takes (``producer.batch``):

    submit   download the input, ``submit_batch`` it: validated, published through the
             team's queue (so its buckets, budget and fairness apply), resumable
    collect  ``collect_into`` the batch's stored result files, each round committed
             before its results are acknowledged; the counts are kept up to date meanwhile
    clean    the batch is recorded as ended, its files shown; the gateway's copy deleted

Each step records its end in the row, and each resumes where an interrupted run stopped:
submit publishes only what has no job yet, collect writes only lines not stored yet. So
the HTTP request that created the batch may end at once, and a process that stops (a
deploy, a crash) loses nothing: its leases lapse and another process, or the same one
restarted, takes the batches up again.

Why here and not elsewhere: a task of the request dies with it, and a plain background task
with its process; the workers sit below the producer (a batch is a producer's pipeline,
submit and collect, which they must not import), scale on queue depth rather than on
batches, and hold no database of files. A runner needs only the front door's own
connections, and every front-door process can take any batch over.

The runner acts for the API key that created the batch: its jobs and control requests are
signed with that key's stored hash (``queuegate.signing.Signer``; the key itself is never
kept), so the workers prove them as they prove the front door's own requests, and a
revoked key's batch stops being served. The runner then winds it up without the key: it
publishes nothing more, collects what the key's jobs were answered (already paid for)
through the gateway's record in Redis (``gateway_record``), writes each request left
unserved as a failed line naming the revocation, and fails the batch with its files.

Runners are shared between teams: a free runner takes a batch of the team whose batches
hold the fewest runners (over every process), and a runner that is full gives one back
when a team waits with fewer: at once from a team holding two more or more, and, so that
teams take turns, from a team holding one more once its batch, collecting, has held the
runner for a turn (``batch_runner_turn``). A batch given back resumes later where it
stopped, as after a lost lease, and its jobs are served by the workers meanwhile; only its
collecting waits. So one team's slow batches (a low rpm, a provider that crawls) keep
another team's batch from starting for a turn at most, not until they end.

Every run that ends in a fault of ours (not an outage, which only pauses it) is counted.
At ``MAX_FAULTS`` the runner gives the batch up, as a revoked key's is wound up: nothing
more is published or served, every answer its jobs got (paid for) is collected into its
files, each request left unserved is an errored line saying why, and it fails once, its
counts adding up. Should winding it up fail too, the batch fails showing the lines it has
written, and keeps the gateway's copy: what was answered and not collected can still be
collected there. A batch that has ended is let go even when the gateway's copy could not
be deleted (it expires).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import secrets
import socket
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from frontdoor.batches import records
from frontdoor.batches.files import new_result_file, read_file, show_files
from frontdoor.batches.gateway_record import GatewayRecord
from frontdoor.batches.records import MAX_FAULTS, BatchRow, LeaseLost
from frontdoor.batches.results import StoredResults
from producer.batch import collect_into, collect_state, delete_batch, submit_batch
from producer.batch.checks import batch_checks
from producer.batch.formats import FORMATS, FormatName, refused
from producer.batch.jobs import Check
from producer.batch.lines import BatchFile
from producer.batch.lock import LockHeld
from producer.batch.state import BatchState
from producer.client import GatewayClient
from queuegate.control import CATEGORIES, BatchMeta, Category, Counts
from queuegate.db import DB_ERRORS
from queuegate.errors import (
    BatchError,
    BatchInvalid,
    ControlRefused,
    GatewayError,
    QueueFull,
    ServiceUnavailable,
)
from queuegate.keys import Keys
from queuegate.messages import ErrorInfo
from queuegate.request_limits import Limits
from queuegate.settings import Settings
from queuegate.signing import Signer
from queuegate.tenancy import live_api_key

log = logging.getLogger(__name__)

RETRY_AFTER = 5.0
"""Seconds a batch rests after a run that failed (an outage, a fault) before it is taken up."""
LOCK_PATIENCE = 150.0
"""Seconds a batch's collect lock may be found held by another before each run it stops
counts as failed: past the broker's heartbeat timeout (60 s by default, a dead peer found
within two of its intervals), which drops a runner that stalled past its lease with its
lock. A holder still there past it lives on (the team's own ``queuegate batch collect``)."""
OUTAGES: tuple[type[Exception], ...] = (ServiceUnavailable, *DB_ERRORS)
"""What pauses a run without counting against the batch: it is taken up again later."""
UNFOLLOWED: tuple[type[Exception], ...] = (*OUTAGES, ControlRefused)
"""What leaves a tick's progress unread: the steps meet an outage or a revoked key."""
UNCOUNTED: tuple[type[Exception], ...] = (*DB_ERRORS, LeaseLost)
"""What keeps a fault from being counted: the batch is not this runner's to count."""
UNCOUNTED_AT_FAULT: tuple[type[Exception], ...] = (*UNCOUNTED, ServiceUnavailable)
"""And, at counting it, Redis down as the batch's copy is given up to the team: counted the
next time, when that can be done."""
STEPPING = ("submit", "collect")
"""Phases in which the gateway holds the batch and counts its progress."""
SHOWN_PROBLEMS = 100
"""Invalid lines listed in a failed batch's ``errors``."""
CHUNK = 1000
"""custom_ids asked about in one control request."""


@dataclasses.dataclass(frozen=True)
class _Held:
    """A batch a runner of this process holds: its run, its task, since when (monotonic)."""

    run: _Run
    task: asyncio.Task[None]
    since: float

    @property
    def team(self) -> str:
        return self.run.row.team


class BatchRunner:
    """Takes batches left to run, a few at a time, and drives each to its end::

    runner = BatchRunner(settings, pool, redis, limits=Limits.of(settings, catalog))
    task = asyncio.create_task(runner.run(stop))
    runner.wake()          # a batch was just created: look now rather than at the next tick
    """

    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        redis: aioredis.Redis,
        *,
        limits: Limits,
        name: str | None = None,
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._redis = redis
        # Each request is checked as the synchronous endpoint of its API checks a body: what
        # the endpoint refuses, a field it does not carry above all, is answered as a failed
        # line naming it, never left out unread and the rest sent on.
        self._checks = batch_checks(limits)
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._lease = settings.batch_runner_lease
        self._tick = min(1.0, self._lease / 3)
        self._wake = asyncio.Event()
        self._running: dict[str, _Held] = {}
        """By batch id, in the order they were taken."""
        self._given_back: set[str] = set()
        self._locked: dict[str, float] = {}
        """By batch id, since when its collect lock was found held by another (monotonic)."""

    def wake(self) -> None:
        self._wake.set()

    async def cancel(self, team: str, api: records.Api, batch_id: str) -> BatchRow | None:
        """Cancel one of the team's batches, as every cancel does (the APIs', the
        dashboard's): marked ``cancelling`` and looked at now, the gateway told on the next
        tick; requests not served yet end canceled. The batch, None when the team has none
        of that id."""
        row = await records.request_cancel(self._pool, team, api, batch_id)
        self.wake()
        return row

    async def run(self, stop: asyncio.Event) -> None:
        """Run batches until ``stop``; then give back the ones in hand, for the next runner."""
        stopping = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                await self._take()
                self._wake.clear()
                waking = asyncio.create_task(self._wake.wait())
                await asyncio.wait(
                    [stopping, waking, *self._tasks()],
                    timeout=self._tick,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                waking.cancel()
        finally:
            stopping.cancel()
            tasks = self._tasks()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _tasks(self) -> list[asyncio.Task[None]]:
        return [held.task for held in self._running.values()]

    async def _take(self) -> None:
        while len(self._running) < self._settings.batch_runners or await self._give_back():
            try:
                row = await records.claim(self._pool, self.name, self._lease)
            except DB_ERRORS as exc:
                log.warning("cannot look for batches to run: %s", exc)
                return
            if row is None:
                return
            run = _Run(self._settings, self._pool, self._redis, row, self.name, checks=self._checks)
            task = asyncio.create_task(self._drive(run), name=f"batch {row.id}")
            self._running[row.id] = _Held(run, task, time.monotonic())
            task.add_done_callback(functools.partial(self._forget, row.id))

    def _forget(self, batch_id: str, _: asyncio.Task[None]) -> None:
        self._running.pop(batch_id, None)

    async def _give_back(self) -> bool:
        """Give back one of the batches in hand when a team with a batch waiting holds
        fewer runners than its team (counted over every process): at once when its team
        holds two more or more (its youngest run, which has done least), else, so that teams
        holding as many take turns, the longest held of those collecting past a turn. The
        batch rests a tick, so the one that waited takes the runner first. Whether one was."""
        try:
            shares = await records.shares(self._pool)
        except DB_ERRORS as exc:
            log.warning("cannot see how the runners are shared: %s", exc)
            return False
        if shares.fewest_waiting is None:
            return False
        fewest = shares.fewest_waiting

        def held(batch: _Held) -> int:
            return shares.held.get(batch.team, 0)

        batches = list(self._running.values())
        over = [b for b in batches if held(b) > fewest + 1]
        turned = [
            b
            for b in batches
            if held(b) == fewest + 1
            and b.run.row.phase == "collect"
            and time.monotonic() - b.since >= self._settings.batch_runner_turn
        ]
        if over:
            batch = max(over, key=lambda b: (held(b), b.since))
        elif turned:
            batch = min(turned, key=lambda b: b.since)
        else:
            return False
        log.info(
            "batch %s: runner given to another team's waiting batch (team %s holds %d "
            "runners, the team waiting %d); resumed later",
            batch.run.row.id,
            batch.team,
            held(batch),
            fewest,
        )
        self._given_back.add(batch.run.row.id)
        batch.task.cancel()
        await asyncio.wait([batch.task])
        return True

    async def _drive(self, run: _Run) -> None:
        """One run of a batch while this runner holds it; the lease is given back after."""
        row = run.row
        rest, locked = 0.0, False
        try:
            async with run:
                await run.heartbeat(self._lease, self._tick)
        except LeaseLost:
            log.info("batch %s: taken over by another runner", row.id)
        except QueueFull as exc:
            log.info("batch %s: paused, resumed later: %s", row.id, exc)
            rest = RETRY_AFTER
        except LockHeld as exc:
            rest, locked = RETRY_AFTER, True
            # A runner that stalled past its lease holds the lock until the broker drops its
            # connection at its missed heartbeats: counted as failures at once, five runs 5 s
            # apart failed the batch first, its lines in no file (attack bd, a 60 s SIGSTOP).
            since = self._locked.setdefault(row.id, time.monotonic())
            if time.monotonic() - since < LOCK_PATIENCE:
                log.info("batch %s: paused, resumed later: %s", row.id, exc)
            else:  # a holder that lives on: the team's own collect, say
                await self._fault(row.id, exc)
        except OUTAGES as exc:
            log.warning("batch %s: paused by an outage, resumed later: %s", row.id, exc)
            rest = RETRY_AFTER
        except Exception as exc:
            rest = RETRY_AFTER
            await self._fault(row.id, exc)
        finally:
            if not locked:
                self._locked.pop(row.id, None)
            if row.id in self._given_back:
                self._given_back.discard(row.id)
                rest = self._tick
            with contextlib.suppress(*DB_ERRORS, OSError):
                await asyncio.shield(records.release(self._pool, row.id, self.name, after=rest))

    async def _fault(self, batch_id: str, exc: Exception) -> None:
        """Count a run ended by something no retry may mend, in one log line (with the
        traceback the first time, when it is not an error of ours). Past ``MAX_FAULTS`` a
        running batch fails with the lines it has written; an ended one is let go."""
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                row = await records.held_by(conn, batch_id, self.name)
                faults = row.faults + 1
                cause = f"{type(exc).__name__}: {exc}"
                if faults < MAX_FAULTS:
                    log.warning(
                        "batch %s: run %d of %d failed, tried again in %.0f s: %s",
                        batch_id,
                        faults,
                        MAX_FAULTS,
                        RETRY_AFTER,
                        cause,
                        exc_info=None if faults > 1 or isinstance(exc, GatewayError) else exc,
                    )
                    await records.update(conn, batch_id, self.name, faults=faults)
                elif row.phase not in STEPPING:  # it has ended: only its cleaning failed
                    log.warning(
                        "batch %s: the gateway's copy could not be deleted (%s); it expires",
                        batch_id,
                        cause,
                    )
                    # Let go: the team's `queuegate batch delete` may drop it meanwhile.
                    await _gateway_record(self._settings, self._redis, row).hand_over()
                    await records.update(conn, batch_id, self.name, faults=faults, phase="done")
                elif faults == MAX_FAULTS:
                    log.error(
                        "batch %s: given up after %d failed runs, ended with what was answered, "
                        "the rest errored: %s",
                        batch_id,
                        faults,
                        cause,
                    )
                    # Why, for the run that winds it up (``_Run._give_up``) and for its caller.
                    reason = (
                        f"the gateway gave up running this batch after {faults} failed runs "
                        f"({cause})"
                    )
                    error = _error("batch_failed", reason)
                    errors = [*(row.errors or []), error]
                    await records.update(conn, batch_id, self.name, faults=faults, errors=errors)
                else:
                    log.warning("batch %s: could not be wound up either: %s", batch_id, cause)
                    # The gateway's copy is left to expire rather than deleted: results
                    # answered but not collected, already paid for, stay collectable there,
                    # by the team's own collect, which deletes it once done (given up to the
                    # team: no longer the front door's to end).
                    await _gateway_record(self._settings, self._redis, row).hand_over()
                    reason = (
                        f"the batch could not be run ({cause}); answers not in its files stay "
                        f"with the gateway: `queuegate batch collect {row.id} --team "
                        f"{row.team}` writes them"
                    )
                    # In place of the give-up's error: the batch ends with one.
                    row = dataclasses.replace(row, errors=(row.errors or [])[:-1])
                    error = _error("batch_failed", reason)
                    await _fail(conn, row, self.name, error, phase="done", faults=faults)
        except UNCOUNTED_AT_FAULT as lost:
            log.warning("batch %s: run failed (%s), not counted: %s", batch_id, exc, lost)


class _Run:
    """One batch in one runner's hands: its client of the gateway and its heartbeat."""

    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        redis: aioredis.Redis,
        row: BatchRow,
        runner: str,
        *,
        checks: dict[FormatName, Check],
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._redis = redis
        self.row = row
        self._runner = runner
        self._checks = checks
        self._signer: Signer | None = None
        """The key's signer while it is live; None once it is revoked."""
        self._client: GatewayClient | None = None
        self._state: BatchState | GatewayRecord | None = None
        self._cancel_sent = False

    async def __aenter__(self) -> _Run:
        key = await live_api_key(self._pool, self.row.key_id)
        if key is None:
            self._stop_serving()
            return self
        self._signer = Signer(self.row.key_id, key[1])
        self._client = GatewayClient(
            self._settings, team=self.row.team, api_key=self._signer, listen=False
        )
        await self._client.__aenter__()
        self._state = BatchState(self._client.control, self.row.id)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            await self._client.__aexit__(None, None, None)

    def _stop_serving(self) -> GatewayRecord:
        """The key is revoked: from now on the batch is read in the gateway's record."""
        self._signer = None
        record = _gateway_record(self._settings, self._redis, self.row)
        self._state = record
        return record

    @property
    def _who(self) -> dict[str, Any]:
        return {"team": self.row.team, "api_key": self._signer}

    async def heartbeat(self, lease: float, tick: float) -> None:
        """Drive the batch while the lease is renewed and progress and cancels followed,
        each tick; LeaseLost as soon as the lease is found lost."""
        tasks = [
            asyncio.create_task(self._steps()),
            asyncio.create_task(self._keep(lease, tick)),
            asyncio.create_task(self._follow(tick)),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _keep(self, lease: float, tick: float) -> None:
        """Renew the lease every tick: on its own, so a slow gateway never lets it lapse."""
        while True:
            await asyncio.sleep(tick)
            if await records.renew(self._pool, self.row.id, self._runner, lease) is None:
                raise LeaseLost(f"batch {self.row.id} was taken over")

    async def _follow(self, tick: float) -> None:
        """Every tick, pass a cancel the caller asked for on to the gateway and copy its
        counts to the row. Best effort: an outage, or the key just revoked, is met by the
        steps themselves."""
        while True:
            await asyncio.sleep(tick)
            try:
                await self._follow_once()
            except UNFOLLOWED as exc:
                log.info("batch %s: progress not read this time: %s", self.row.id, exc)

    async def _follow_once(self) -> None:
        assert self._state is not None
        row = await self._reload()
        if row.phase not in STEPPING:
            return
        meta = await self._state.load()
        if meta is None:
            return  # not recorded by the gateway yet: nothing published, nothing counted
        if row.status == "cancelling" and not self._cancel_sent:
            await self._state.cancel()
            self._cancel_sent = True
        counts = await self._state.counts(meta)
        values: dict[str, Any] = _counts(row, counts)
        if row.status == "validating":
            values.update(status="in_progress", in_progress_at=_now())
        if counts.written >= counts.total and row.status == "in_progress":
            values.update(status="finalizing", finalizing_at=_now())
        if any(getattr(row, name) != value for name, value in values.items()):
            async with self._pool.acquire() as conn, conn.transaction():
                # Counts read before the batch ended must not overwrite its final ones.
                if (await records.held_by(conn, row.id, self._runner)).phase in STEPPING:
                    await records.update(conn, row.id, self._runner, **values)

    async def _steps(self) -> None:
        if self.row.faults >= MAX_FAULTS and self.row.phase in STEPPING:
            await self._give_up()
            return
        if self._signer is not None:
            try:
                await self._served()
                return
            except ControlRefused:
                if await live_api_key(self._pool, self.row.key_id) is not None:
                    raise
                self._stop_serving()
        await self._wind_up()

    async def _served(self) -> None:
        if self.row.phase == "submit":
            await self._submit()
        if self.row.phase == "collect":
            await self._collect()
        if self.row.phase == "clean":
            await self._clean()

    async def _set(self, **values: Any) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await records.update(conn, self.row.id, self._runner, **values)
        self.row = await self._reload()

    async def _reload(self) -> BatchRow:
        row = await records.get_batch(self._pool, self.row.team, self.row.api, self.row.id)
        if row is None:
            raise LeaseLost(f"batch {self.row.id} was deleted")
        return row

    async def _submit(self) -> None:
        assert self._state is not None
        meta = await self._state.load()
        self.row = await self._reload()
        if meta is None and self.row.in_progress_at is not None:
            await self._lost("before all its requests were published")
            return
        if meta is None and self.row.status == "cancelling":
            await self._canceled_before_start()
            return
        anthropic = self.row.api == "anthropic"
        with tempfile.TemporaryDirectory(prefix="queuegate-batch-") as work:
            path = await self._download(Path(work))
            reasons: dict[int, ErrorInfo] = {}
            # A batch canceled after the gateway recorded it publishes nothing more.
            if meta is None or not await self._state.is_canceled():
                try:
                    report = await submit_batch(
                        self._settings,
                        path,
                        name=self.row.id,
                        skip_invalid=anthropic,
                        deadline=self.row.expires_at - datetime.now(UTC),
                        # The runner pauses a full queue's batch itself (QueueFull), and
                        # checks for its cancel, its key and its share of runners meanwhile.
                        pause_when_full=False,
                        checks=self._checks,
                        front_door=True,
                        **self._who,
                    )
                except BatchInvalid as exc:
                    # A Message Batch's invalid requests are errored, whatever they are; an
                    # OpenAI batch fails on lines that are no request (OpenAI validates the
                    # file), and answers a request its endpoint refuses 400, in its file.
                    if anthropic:
                        problems = _invalid_requests(exc.problems) + exc.refused
                        await self._refused_all(path, sorted(problems, key=lambda p: p[0]))
                    elif exc.refused and not exc.problems:
                        await self._refused_all(path, exc.refused)
                    else:
                        await self._invalid(exc)
                    return
                reasons = dict(_invalid_requests(report.skipped) + report.refused)
            refused = await self._refused(path, reasons)
        await self._start_collect(refused)

    async def _refused(
        self, path: Path, reasons: dict[int, ErrorInfo]
    ) -> list[tuple[str, ErrorInfo]]:
        """(custom_id, error) of the requests the gateway did not take: those it keeps no
        line of (they were invalid), whichever run of submit found them."""
        assert self._state is not None
        entries = _custom_ids(path)
        found: list[tuple[str, ErrorInfo]] = []
        unknown = ErrorInfo(
            code="invalid_request",
            message="its params are not valid"
            if self.row.api == "anthropic"
            else "its body is not valid",
        )
        for start in range(0, len(entries), CHUNK):
            chunk = entries[start : start + CHUNK]
            lines = await self._state.line_numbers([custom_id for _, custom_id in chunk])
            found += [
                (custom_id, reasons.get(number, unknown))
                for (number, custom_id), line in zip(chunk, lines, strict=True)
                if line is None
            ]
        return found

    async def _download(self, work: Path) -> Path:
        path = work / "input.jsonl"
        with path.open("wb") as f:
            async for part in read_file(self._pool, self.row.input_file_id):
                f.write(part)
        return path

    async def _start_collect(self, refused: list[tuple[str, ErrorInfo]]) -> None:
        """Make the result files and write the refused requests' lines, with the next step."""
        async with self._pool.acquire() as conn, conn.transaction():
            await records.held_by(conn, self.row.id, self._runner)
            self.row = await self._reload()
            sink = self._sink(await self._result_files(conn))
            for custom_id, error in refused:
                sink.write(self._refused_line(custom_id, error), failed=True)
            await sink.flush(conn)
            await records.update(
                conn,
                self.row.id,
                self._runner,
                phase="collect",
                refused=len(refused),
                status="in_progress",
                in_progress_at=_now(),
            )
        self.row = await self._reload()

    async def _result_files(self, conn: asyncpg.Connection) -> list[str]:
        """The batch's result files: made once, their ids kept in its row."""
        row = self.row
        if row.output_file_id is not None:
            return [f for f in (row.output_file_id, row.error_file_id) if f is not None]
        if row.api == "anthropic":
            output = await new_result_file(
                conn, team=row.team, purpose="message_batch_results", filename=f"{row.id}.jsonl"
            )
            await records.update(conn, row.id, self._runner, output_file_id=output)
            self.row = dataclasses.replace(row, output_file_id=output)
            return [output]
        output = await new_result_file(
            conn, team=row.team, purpose="batch_output", filename=f"{row.id}_output.jsonl"
        )
        errors = await new_result_file(
            conn, team=row.team, purpose="batch_output", filename=f"{row.id}_error.jsonl"
        )
        await records.update(
            conn, row.id, self._runner, output_file_id=output, error_file_id=errors
        )
        self.row = dataclasses.replace(row, output_file_id=output, error_file_id=errors)
        return [output, errors]

    def _sink(self, files: list[str]) -> StoredResults:
        return StoredResults(self._pool, batch_id=self.row.id, runner=self._runner, files=files)

    def _files(self) -> list[str]:
        """The result files made for the batch: output first."""
        return [f for f in (self.row.output_file_id, self.row.error_file_id) if f is not None]

    async def _collect(self) -> None:
        row = self.row = await self._reload()
        try:
            # The input is fetched only should results its full queue refused be asked for
            # again: the path submit recorded was a temporary one.
            with tempfile.TemporaryDirectory(prefix="queuegate-batch-") as work:
                report = await collect_into(
                    self._settings,
                    row.id,
                    self._sink(self._files()),
                    source=functools.partial(self._download, Path(work)),
                    **self._who,
                )
        except BatchError as exc:
            if await self._gateway_meta() is not None:
                raise
            await self._lost(f"while its results were collected ({exc})")
            return
        counts, lines = await self._collected_elsewhere(report.counts)
        await self._end(counts, collected=True, lines=lines)

    async def _collected_elsewhere(self, counts: Counts) -> tuple[Counts, list[dict[str, Any]]]:
        """The batch's counts as its files hold them, and an error line for each request the
        gateway counts written that they lack: one whose result the team's own ``queuegate
        batch collect`` took (run while no front door ran the batch), its answer in that
        collect's file. Counted as written, the batch ended ``completed`` with lines its
        output file did not hold."""
        fmt = FORMATS[self.row.api]
        held: set[str] = set()
        tally: Counter[Category] = Counter()
        async for line in self._sink(self._files()).existing():
            held.add(str(line["custom_id"]))
            if "gateway" in line:  # an answer; a request refused unpublished has no block
                tally[fmt.category(line)] += 1
        if len(held) >= counts.written + self.row.refused:
            return counts, []
        with tempfile.TemporaryDirectory(prefix="queuegate-batch-") as work:
            custom_ids = [c for _, c in _custom_ids(await self._download(Path(work)))]
        why = ErrorInfo(
            code="already_answered",
            message="its answer was collected outside the front door, by the team's own "
            f"`queuegate batch collect {self.row.id}`, into that collect's file",
        )
        lines = [self._refused_line(c, why) for c in custom_ids if c not in held]
        tally["failed"] += len(lines)
        return counts.model_copy(update={c: tally[c] for c in CATEGORIES}), lines

    async def _gateway_meta(self) -> BatchMeta | None:
        assert self._state is not None
        return await self._state.load()

    async def _end(
        self,
        counts: Counts,
        *,
        collected: bool = False,
        lines: list[dict[str, Any]] | None = None,
        refused: int = 0,
        failure: dict[str, Any] | None = None,
    ) -> None:
        """Record how the batch ended and show its files, in one transaction, with ``lines``
        of requests that were never published (Message Batches only) or whose answers the
        files lack (``_collected_elsewhere``). ``collected``: its
        results were collected (it was finalized), rather than it ended before it ran;
        ``failure``: the error it failed with, unless the caller canceled it."""
        async with self._pool.acquire() as conn, conn.transaction():
            await records.held_by(conn, self.row.id, self._runner)
            row = self.row = await self._reload()
            if lines:
                sink = self._sink(await self._result_files(conn))
                for line in lines:
                    sink.write(line, failed=True)
                await sink.flush(conn)
                row = self.row
            if row.status == "cancelling":
                status = "cancelled"
            elif failure is not None:
                status = "failed"
            else:
                status = "expired" if counts.expired else "completed"
            files = await _keep_written(conn, row)
            await show_files(conn, [f for f in files.values() if f is not None])
            if refused:
                row = dataclasses.replace(row, refused=refused)
            values: dict[str, Any] = {**_counts(row, counts), **files, "refused": row.refused}
            if failure is not None and failure not in (row.errors or []):
                # A batch given up holds its failure already (``BatchRunner._fault``).
                values["errors"] = [*(row.errors or []), failure]
            if collected:
                values["finalizing_at"] = _now()
            await records.update(
                conn,
                row.id,
                self._runner,
                **values,
                status=status,
                **{f"{status}_at": _now()},
                phase="clean",
            )
        self.row = await self._reload()

    async def _clean(self) -> None:
        """Forget the gateway's copy (its state and results queue), then be done."""
        if isinstance(self._state, GatewayRecord):
            await self._state.delete()
        else:
            # The gateway refuses to delete a batch the front door runs (the team's `batch
            # delete` would lose it): given up to the team first, as the runner alone can.
            await _gateway_record(self._settings, self._redis, self.row).hand_over()
            with contextlib.suppress(BatchError):  # already forgotten
                await delete_batch(self._settings, self.row.id, **self._who)
        await self._set(phase="done")

    async def _wind_up(self) -> None:
        """The key that created the batch is revoked: nothing more is published, and the
        gateway refuses the key. What its jobs were answered, already paid for, is
        collected all the same; each request left unserved is a failed line naming the
        revocation; the batch fails once, its files shown."""
        record = self._stop_serving()
        self.row = await self._reload()
        if self.row.phase == "clean":
            await self._clean()
            return
        reason = f"the API key {self.row.key_id} that created this batch was revoked"
        failure = _error(
            "key_revoked",
            f"{reason}: the requests it had not served are in the error file, answered "
            "401 unauthorized; submit them again with a live key",
        )
        log.warning("batch %s: %s; ending it with what was served", self.row.id, reason)
        await self._stop(record, ErrorInfo(code="unauthorized", message=reason), failure)

    async def _give_up(self) -> None:
        """The batch's runs failed ``MAX_FAULTS`` times (``BatchRunner._fault``, which
        logged it and put why in its last error): it is stopped and ended as a revoked key's
        is, through the gateway's copy as the key can still reach it (so a collect the team
        runs itself, holding the batch's lock, is not raced)."""
        assert self._state is not None and self.row.errors
        failure = self.row.errors[-1]
        why = ErrorInfo(code="internal_error", message=str(failure["message"]))
        await self._stop(self._state, why, failure)

    async def _stop(
        self, state: BatchState | GatewayRecord, why: ErrorInfo, failure: dict[str, Any]
    ) -> None:
        """End a batch that will not be served further, failed with ``failure``: nothing
        more is published, what its jobs were answered (already paid for) is collected, and
        each request left unserved is a failed line, ``why`` with ``not served:``."""
        unserved = why.model_copy(update={"message": f"not served: {why.message}"})
        meta = await state.load()
        if meta is None:
            if self.row.in_progress_at is not None:
                await self._lost("before all its requests were published")
            elif self.row.status == "cancelling":
                await self._canceled_before_start()
            else:
                await self._unstarted(unserved, failure)
        else:
            # Jobs a worker has not served yet are answered canceled, uncalled.
            await state.cancel()
            if self.row.phase == "submit":
                with tempfile.TemporaryDirectory(prefix="queuegate-batch-") as work:
                    refused = await self._refused(await self._download(Path(work)), {})
                await self._start_collect(refused)
            sink = self._sink(self._files())
            report = await collect_state(self._settings, state, sink, unserved=unserved)
            await self._end(report.counts, collected=True, failure=failure)
        await self._clean()

    async def _unstarted(self, unserved: ErrorInfo, failure: dict[str, Any]) -> None:
        """Stopped before anything was published: an OpenAI batch fails with no files, as
        one refused before it ran does; a Message Batch lists each request errored."""
        if self.row.api == "openai":
            await self._set(status="failed", failed_at=_now(), errors=[failure], phase="clean")
            return
        with tempfile.TemporaryDirectory(prefix="queuegate-batch-") as work:
            custom_ids = [c for _, c in _custom_ids(await self._download(Path(work)))]
        lines = [self._refused_line(c, unserved) for c in custom_ids]
        await self._end(_no_counts(failed=len(lines)), lines=lines, failure=failure)

    async def _canceled_before_start(self) -> None:
        """Canceled before anything was published: every request is canceled (a Message
        Batch lists each; an OpenAI batch ends with no files, as OpenAI's does)."""
        if self.row.api == "openai":
            await self._end(_no_counts())
            return
        with tempfile.TemporaryDirectory(prefix="queuegate-batch-") as work:
            custom_ids = [c for _, c in _custom_ids(await self._download(Path(work)))]
        lines = [{"custom_id": c, "result": {"type": "canceled"}} for c in custom_ids]
        n = len(lines)
        await self._end(_no_counts(canceled=n), lines=lines)

    async def _refused_all(self, path: Path, problems: list[tuple[int, ErrorInfo]]) -> None:
        """Not one request was taken: each is a failed line naming why, and the batch ends."""
        lines = [self._refused_line(c, error) for c, error in _named(path, problems)]
        await self._end(_no_counts(), lines=lines, refused=len(lines))

    def _refused_line(self, custom_id: str, error: ErrorInfo) -> dict[str, Any]:
        return refused(self.row.api, self.row.id, custom_id, error)

    async def _invalid(self, exc: BatchInvalid) -> None:
        """An OpenAI batch whose input has lines that are no request of its endpoint fails
        as a whole, listing them."""
        errors = [
            {"code": "invalid_request", "line": number, "message": reason, "param": None}
            for number, reason in exc.problems[:SHOWN_PROBLEMS]
        ]
        if not errors:
            message = "the input file holds no request"
            errors = [{"code": "empty_file", "line": None, "message": message, "param": None}]
        await self._set(status="failed", failed_at=_now(), errors=errors, phase="clean")

    async def _lost(self, when: str) -> None:
        """The gateway lost the batch's state (Redis lost its data): running it again would
        serve its requests twice. It fails, its files keeping what was collected."""
        reason = f"the gateway lost this batch's progress {when}; submit it again"
        log.error("batch %s: %s", self.row.id, reason)
        async with self._pool.acquire() as conn, conn.transaction():
            row = await records.held_by(conn, self.row.id, self._runner)
            await _fail(conn, row, self._runner, _error("batch_lost", reason))
        self.row = await self._reload()


def _gateway_record(settings: Settings, redis: aioredis.Redis, row: BatchRow) -> GatewayRecord:
    return GatewayRecord(redis, Keys(settings.redis_prefix), row.team, row.id)


async def _fail(
    conn: asyncpg.Connection,
    row: BatchRow,
    runner: str,
    error: dict[str, Any],
    *,
    phase: records.Phase = "clean",
    **values: Any,
) -> None:
    """Inside the caller's transaction: the batch fails with ``error``, its result files
    shown with the lines written so far, and goes on to ``phase`` (forgetting the
    gateway's copy, by default)."""
    files = await _keep_written(conn, row)
    await show_files(conn, [f for f in files.values() if f is not None])
    await records.update(
        conn,
        row.id,
        runner,
        **files,
        **values,
        status="failed",
        failed_at=_now(),
        errors=[*(row.errors or []), error],
        phase=phase,
    )


async def _keep_written(conn: asyncpg.Connection, row: BatchRow) -> dict[str, Any]:
    """The result file ids to show: an empty OpenAI file is dropped, as OpenAI leaves
    ``output_file_id`` or ``error_file_id`` unset when no line went there."""
    files: dict[str, Any] = {}
    for column in ("output_file_id", "error_file_id"):
        file_id = getattr(row, column)
        if file_id is None:
            continue
        size = await conn.fetchval("SELECT bytes FROM api_files WHERE id = $1", file_id)
        if size == 0 and row.api == "openai":
            await conn.execute("DELETE FROM api_files WHERE id = $1", file_id)
            file_id = None
        files[column] = file_id
    return files


def _error(code: str, message: str) -> dict[str, Any]:
    """An entry of a batch's ``errors``, in OpenAI's shape."""
    return {"code": code, "message": message, "line": None, "param": None}


def _counts(row: BatchRow, counts: Counts) -> dict[str, Any]:
    """The row's counts from the gateway's. A batch's total is its requests: a Message
    Batch's known from its creation, an OpenAI batch's those the gateway counts (the valid
    ones) and those it refused."""
    values: dict[str, Any] = {
        "done": counts.done,
        "failed": counts.failed,
        "expired": counts.expired,
        "canceled": counts.canceled,
        "spend_usd": Decimal(str(counts.spend_usd)),
    }
    if row.api == "openai":
        values["total"] = counts.total + row.refused
    return values


def _no_counts(**values: int) -> Counts:
    numbers = {"total": 0, "published": 0, "done": 0, "failed": 0, "expired": 0, "canceled": 0}
    return Counts(
        **{**numbers, **values},
        spend_usd=0.0,
        first_written=None,
        last_written=None,
        canceled_flag=False,
    )


def _custom_ids(path: Path) -> list[tuple[int, str]]:
    """(line, custom_id) of every request of a stored input that names one."""
    found = []
    for number, entry in BatchFile(path):
        if isinstance(entry, dict) and isinstance(entry.get("custom_id"), str):
            found.append((number, entry["custom_id"]))
    return found


def _named(path: Path, problems: list[tuple[int, ErrorInfo]]) -> list[tuple[str, ErrorInfo]]:
    """(custom_id, error) of each problem, by its line."""
    by_line = dict(_custom_ids(path))
    return [(by_line[n], error) for n, error in problems if n in by_line]


def _invalid_requests(problems: list[tuple[int, str]]) -> list[tuple[int, ErrorInfo]]:
    """Submit's problems (lines no request of the format) as the errors answering them."""
    return [(n, ErrorInfo(code="invalid_request", message=reason)) for n, reason in problems]


def _now() -> datetime:
    return datetime.now(UTC)


__all__ = ["BatchRunner"]
