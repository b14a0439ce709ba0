"""Submitting a batch file: validate every request first, then publish those with no job yet.

Two passes over the file, so memory stays constant whatever its size: the first validates
each entry and indexes its custom_id in Redis (duplicates found there, not in memory); the
second publishes, ``window`` confirms outstanding at once, and records each custom_id only
once the broker has confirmed its job. A job confirmed but not yet recorded when the process
dies is published again by the re-run under the same job id: the worker answers it from its
stored result, and collect keeps one answer per custom_id.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiormq

from producer.batch.formats import FormatName
from producer.batch.jobs import Check, JobReader, Refused, check_batch_name, default_name
from producer.batch.lines import BatchFile
from producer.batch.lock import BatchLock, hold_lock
from producer.batch.state import BatchState
from producer.client import GatewayClient
from queuegate.control import BatchMeta, being_submitted, submission_jobs
from queuegate.errors import (
    BatchError,
    BatchInvalid,
    PublishRefused,
    QueueFull,
    ServiceUnavailable,
)
from queuegate.messages import ChatJob, ErrorInfo
from queuegate.registry import check_team_name
from queuegate.settings import Settings
from queuegate.signing import ApiKey
from queuegate.topology import Topology
from queuegate.visible import clipped, clipped_path

log = logging.getLogger(__name__)

WINDOW = 256
"""Confirms outstanding at once: one at a time caps a publisher near 1.4k jobs/s."""
FULL_RETRY = 1.0
"""Seconds between publishes to a full team queue: nothing announces room in it."""
CHUNK = 500
"""Entries checked against Redis per round trip."""
RECORD_EVERY = 100
"""Confirmed jobs recorded per round trip: at most this many are published again on resume."""
DEFAULT_DEADLINE = timedelta(hours=24)

Progress = Callable[[int, int], None]
"""Called with (done, total) as a batch advances."""


@dataclass(frozen=True)
class SubmitReport:
    name: str
    total: int
    """Valid requests in the file: the batch's size."""
    published: int
    """Jobs published by this run."""
    already: int
    """Jobs an earlier run had published."""
    skipped: list[tuple[int, str]] = field(default_factory=list)
    """Invalid entries left out (with ``skip_invalid``): (number, reason)."""
    refused: list[tuple[int, ErrorInfo]] = field(default_factory=list)
    """Requests the ``checks`` refused, left out for the caller to answer: (number, error)."""
    stopped: str | None = None
    """Why publishing stopped early (canceled, deadline passed), if it did."""


async def submit_batch(
    settings: Settings,
    path: Path | str,
    *,
    team: str,
    name: str | None = None,
    model: str | None = None,
    skip_invalid: bool = False,
    deadline: timedelta = DEFAULT_DEADLINE,
    window: int = WINDOW,
    pause_when_full: bool = True,
    user_id: str | None = None,
    api_key: ApiKey | None = None,
    models: Collection[str] | None = None,
    anthropic_models: Collection[str] | None = None,
    checks: Mapping[FormatName, Check] | None = None,
    on_progress: Progress | None = None,
    front_door: bool = False,
) -> SubmitReport:
    """Publish a batch file's requests as jobs whose results go to the batch's reply queue.

    Runs as the team of ``settings.amqp_url``'s broker user (or ``user_id``), proven by
    ``api_key`` where the team uses one; the gateway keeps the batch's state.

    Re-running it with the same file publishes only what an interrupted run had not. Raises
    BatchInvalid listing every bad entry (nothing is published) unless ``skip_invalid``, and
    whenever no entry is valid.
    ``models``, when given, are the catalog's aliases: a request naming another is invalid;
    ``anthropic_models``, those served by Anthropic alone (fallbacks included): a request
    with an Anthropic-only parameter (``top_k``) for another model is invalid.
    ``checks``: by format, the validation of its API (``jobs.Check``); a request one refuses
    is left out whatever ``skip_invalid`` says, listed in the report's ``refused`` (and in
    BatchInvalid's when no request is left) for the caller to answer as a line of its own.
    ``pause_when_full``: a full team queue pauses publishing until it has room; else its
    QueueFull is raised (the confirmed requests recorded) for the caller to resume later.
    ``front_door``: the HTTP front door's batch runner submits it, and deletes it once ended
    (``BatchMeta.front_door``).
    """
    path = Path(path)
    name = check_batch_name(default_name(path) if name is None else name)
    team = check_team_name(team)
    async with GatewayClient(
        settings, team=team, user_id=user_id, api_key=api_key, listen=False
    ) as client:
        state = BatchState(client.control, name)
        # The first request proves the team: wrong credentials stop here, before any state.
        meta = await state.load()
        if await state.is_canceled():
            raise BatchError(f"batch {name!r} was canceled; submit it under another --name")
        if meta is not None and model is not None and model != meta.model:
            # Its jobs are rebuilt with the recorded model (a re-run, collect asking again):
            # another would publish the rest under the same job ids as other requests.
            first = f"--model {meta.model}" if meta.model else "no --model"
            raise BatchError(
                f"batch {name!r} was submitted with {first}: re-run it with the same, or "
                "without --model (it resumes as submitted), or pick another --name"
            )
        # Hex: job ids and the names derived from them take it as they take a batch name.
        submission = meta.submission if meta else secrets.token_hex(4)
        if meta:
            reader = JobReader.for_meta(
                meta,
                models=models,
                anthropic_models=anthropic_models,
                checks=checks,
                max_bytes=settings.max_job_bytes,
                max_messages=settings.max_job_messages,
            )
        else:
            reader = JobReader(
                batch=name,
                jobs=submission_jobs(name, submission),
                team=team,
                model=model,
                deadline=datetime.now(UTC) + deadline,
                models=models,
                anthropic_models=anthropic_models,
                checks=checks,
                max_bytes=settings.max_job_bytes,
                max_messages=settings.max_job_messages,
            )
        file = BatchFile(path)
        total, problems, refused = await _validate(file, reader, state)
        fingerprint = file.digest.hexdigest()
        if file.aside:
            # As Anthropic's API refuses a field its schema does not have: a key meant for
            # the batch (a model, a deadline) would otherwise be ignored unseen.
            await state.reset_index()
            keys = ", ".join(repr(clipped(key)) for key in file.aside)
            raise BatchError(
                f'{clipped_path(path)}: unknown top-level key {keys} beside "requests", nothing '
                'published: a batch document holds "requests" alone; remove the rest (options '
                "go on the command line)"
            )
        if problems and not skip_invalid:
            await state.reset_index()
            raise _invalid(path, problems)
        if total == 0:
            # The skipped lines' reasons travel with it: all of them are why.
            raise BatchInvalid(f"{path} holds no valid request", problems, refused=refused)
        fresh = meta is None
        if meta is None:
            assert reader.format is not None and reader.deadline is not None
            meta = BatchMeta(
                name=name,
                team=team,
                format=reader.format,
                total=total,
                deadline=reader.deadline,
                fingerprint=fingerprint,
                submission=submission,
                model=model,
                source=str(path.resolve()),
                own_queue=True,
                refused=len(refused),
                front_door=front_door,
            )
            await state.create(meta)
            # As recorded: a gateway of an earlier version keeps no own queue for a batch,
            # and declared the named reply queue of its name instead.
            meta = await state.require()
        else:
            await state.reset_index()
            if meta.fingerprint != fingerprint:
                raise BatchError(
                    f"batch {name!r} was submitted from another file (or {path} changed); "
                    "re-run it with the same file, or pick another --name"
                )
        # One submit publishes at a time: two resuming the batch would publish its rest
        # twice. Its record exists by now (the gateway keeps a lock for a recorded batch
        # only); of submits of a new name at once, only one recorded it.
        lock = await state.lock("submit")
        # On the connection it publishes on: the lock is lost exactly when publishing may
        # have been cut.
        held = await hold_lock(client.connection, lock, being_submitted(name), retake=False)
        reply_to = Topology.of(settings).batch_results_queue(meta)
        sender = _Window(
            client,
            reply_to=reply_to,
            state=state,
            size=window,
            pause_when_full=pause_when_full,
            lock=held,
        )
        try:
            report = await _publish(
                file, reader=reader, state=state, meta=meta, sender=sender, on_progress=on_progress
            )
        except BaseException:
            if fresh and sender.reached == 0 and not front_door:
                # Nothing reached the broker: leave no batch behind to lock the name. Not
                # counted by confirms recorded: jobs confirmed but not recorded yet (a cut
                # connection, an interrupt) are queued, their results bound for its queue.
                # A front door's batch stays (the gateway would refuse): its runner resumes it.
                with contextlib.suppress(Exception):
                    await state.delete()
            raise
        return dataclasses.replace(report, skipped=problems, refused=refused)


async def _validate(
    file: BatchFile, reader: JobReader, state: BatchState
) -> tuple[int, list[tuple[int, str]], list[tuple[int, ErrorInfo]]]:
    """Valid requests, problems and requests refused (``Refused``); valid custom_ids land
    in the state's index.

    A request past the gateway's ``max_job_bytes`` (the reader's) is
    refused or a problem here, with its line, not an error result after it was published.
    """
    problems: list[tuple[int, str]] = []
    refused: list[tuple[int, ErrorInfo]] = []
    chunk: list[tuple[str, int]] = []
    total = 0
    await state.reset_index()

    async def flush() -> None:
        nonlocal total
        firsts = await state.index(chunk)
        for (custom_id, number), first in zip(chunk, firsts, strict=True):
            if first == number:
                total += 1
            else:
                problems.append(
                    (number, f"duplicate custom_id {clipped(custom_id)!r} (first on line {first})")
                )
        chunk.clear()

    for number, entry in file:
        try:
            job = reader.job(entry)
        except Refused as exc:
            refused.append((number, exc.error))
            continue
        except ValueError as exc:
            problems.append((number, str(exc)))
            continue
        chunk.append((job.metadata["custom_id"], number))
        if len(chunk) >= CHUNK:
            await flush()
    if chunk:
        await flush()
    problems.sort()
    return total, problems, refused


def _invalid(path: Path, problems: list[tuple[int, str]]) -> BatchInvalid:
    number, reason = problems[0]
    return BatchInvalid(
        f"{len(problems)} invalid requests in {path}, nothing published (first: line "
        f"{number}: {reason}); fix them or pass --skip-invalid",
        problems,
    )


async def _publish(
    file: BatchFile,
    *,
    reader: JobReader,
    state: BatchState,
    meta: BatchMeta,
    sender: _Window,
    on_progress: Progress | None,
) -> SubmitReport:
    already = (await state.counts(meta)).published
    done = already

    def progress(n: int) -> None:
        if on_progress is not None:
            on_progress(done + n, meta.total)

    sender.on_flush = progress
    stopped: str | None = None
    chunk: list[tuple[int, ChatJob]] = []
    try:
        for number, entry in file:
            try:
                chunk.append((number, reader.job(entry)))
            except ValueError:
                continue  # reported by the validation pass
            if len(chunk) >= CHUNK:
                stopped = await _publish_chunk(chunk, state, meta, sender)
                chunk.clear()
                if stopped:
                    break
        if chunk and not stopped:
            stopped = await _publish_chunk(chunk, state, meta, sender)
    finally:
        await sender.close()
    progress(sender.confirmed)
    return SubmitReport(meta.name, meta.total, sender.confirmed, already, stopped=stopped)


async def _publish_chunk(
    chunk: Sequence[tuple[int, ChatJob]], state: BatchState, meta: BatchMeta, sender: _Window
) -> str | None:
    if await state.is_canceled():
        return "canceled"
    if datetime.now(UTC) >= meta.deadline:
        return "deadline passed"
    custom_ids = [job.metadata["custom_id"] for _, job in chunk]
    lines = await state.line_numbers(custom_ids)
    published = await state.published_among(custom_ids)
    for (number, job), line, done in zip(chunk, lines, published, strict=True):
        if line == number and not done:  # not a duplicate, not published before
            await sender.publish(job)
    return None


class _Window:
    """Publishes with at most ``size`` confirms outstanding; records confirmed custom_ids.

    A semaphore bounds the window: waiting on the whole pending set per publish would cost
    O(size) each time.
    """

    def __init__(
        self,
        client: GatewayClient,
        *,
        reply_to: str,
        state: BatchState,
        size: int,
        pause_when_full: bool,
        lock: BatchLock,
    ) -> None:
        self._client = client
        self._lock = lock
        self._pause_when_full = pause_when_full
        self._reply_to = reply_to
        self._state = state
        self._slots = asyncio.Semaphore(size)
        self._pending: set[asyncio.Task[str]] = set()
        self._unrecorded: list[str] = []
        self._failure: BaseException | None = None
        self._full = asyncio.Lock()
        self._told_full = False
        self.confirmed = 0
        self.reached = 0
        """Publishes the broker may hold: sent, and not refused by it (a nack, unroutable)."""
        self.on_flush: Callable[[int], None] | None = None

    async def publish(self, job: ChatJob) -> None:
        await self._slots.acquire()
        if self._failure is not None:
            self._slots.release()
            raise self._failure
        if len(self._unrecorded) >= RECORD_EVERY:
            await self._record()
        task = asyncio.create_task(self._one(job))
        self._pending.add(task)
        task.add_done_callback(self._done)

    async def _one(self, job: ChatJob) -> str:
        try:
            try:
                await self._send(job)
            except QueueFull:
                if not self._pause_when_full:
                    raise
                await self._when_room(job)
        except (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError) as exc:
            raise ServiceUnavailable(
                f"lost RabbitMQ while publishing batch {self._state.name!r} "
                f"({type(exc).__name__}); run the same submit again to resume"
            ) from exc
        return str(job.metadata["custom_id"])

    async def _when_room(self, job: ChatJob) -> None:
        """Publish ``job`` once the team's full queue has room: a batch larger than the
        queue's quota pauses, as the front door's batch runners do, rather than stopping half
        way. One publish at a time probes the full queue; the others wait on the lock."""
        async with self._full:
            while True:
                try:
                    await self._send(job)
                    return
                except QueueFull as exc:
                    if not self._told_full:
                        self._told_full = True
                        log.info(
                            "batch %s paused until its queue has room: %s", self._state.name, exc
                        )
                    await asyncio.sleep(FULL_RETRY)

    async def _send(self, job: ChatJob) -> None:
        if not self._lock.held:
            # Its connection dropped: another submit may hold the batch now and publish it.
            raise ServiceUnavailable(
                f"lost batch {self._state.name!r}'s submit lock with the broker connection; "
                "run the same submit again to resume"
            )
        self.reached += 1
        try:
            await self._client.publish(job, reply_to=self._reply_to)
        except (QueueFull, PublishRefused):
            self.reached -= 1  # the broker's own answer: it holds no such job
            raise

    def _done(self, task: asyncio.Task[str]) -> None:
        self._pending.discard(task)
        self._slots.release()
        if task.cancelled():
            return
        if (exc := task.exception()) is not None:
            self._failure = self._failure or exc
        else:
            self._unrecorded.append(task.result())

    async def _record(self) -> None:
        confirmed, self._unrecorded = self._unrecorded, []
        await self._state.mark_published(confirmed)
        self.confirmed += len(confirmed)
        if self.on_flush is not None:
            self.on_flush(self.confirmed)

    async def close(self) -> None:
        """Wait for the confirms still outstanding and record them; then raise any failure."""
        try:
            await asyncio.gather(*self._pending, return_exceptions=True)
        finally:
            await self._record()
        if self._failure is not None:
            raise self._failure
