"""Collecting a batch: results from its durable reply queue, written in the batch's format.

Each round takes what has arrived, drops custom_ids already written, appends the lines,
fsyncs, records them with the gateway, and only then acknowledges the messages. A crash
before the fsync leaves the results in the queue; a crash after it leaves lines the gateway
does not know yet, which the next run reads back from the files before taking anything new.
The result of each file's last line stays unacknowledged until a later line of that file
is on disk: a crash or power loss that tears the last line (cut on the next run's open)
leaves its result in the queue, and the next run writes it again, the gateway already
counting it. So every custom_id is written exactly once, however often a run is interrupted. Lines
already in the files count only when their job id is this batch's: another batch's lines
with the same custom_ids are left alone.

Requests that can no longer be answered are written without waiting for the gateway: all
that remain once the deadline has passed (``expired``: the broker dropped their jobs), and,
once the batch is canceled, those never published. A published job is always answered by
a worker (served, or ``canceled`` if it was not served yet), and its line says which. One
whose result its full results queue refused is asked for again once the queue runs dry
(``producer.batch.resend``): answered from its stored outcome, not called or billed twice;
past the deadline too, as is one still in a call then, whose answer is awaited.

An answer the batch's format fails on (a fault of ours) is written as an errored line
(``internal_error``) rather than failing the round, so the round's other answers are kept.

Requests submit's checks refused (``BatchMeta.refused``: their API's own endpoint would have
refused them, ``producer.batch.jobs.Check``) were never published: ``collect`` writes each a
failed line in the batch's format (an ``errored`` result, an error line answered 400)
naming what is wrong, as the front door's batches answer them, read again from the
submitted file with the same checks. These lines carry no ``gateway`` block (no job of the
gateway answered them): a resumed collect tells them from its results by it, and writes
each once.

Once every line is written, ``collect`` deletes the batch: its state and its results queue;
not one the HTTP front door submitted (``BatchMeta.front_door``), which its runner deletes
once it has ended it, the lines this collect took each an error line there saying where its
answer went. ``collect_into`` writes to any ResultSink and leaves the batch for its caller
to delete; ``collect_state`` does so over a state the caller gives.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel
from aiormq.abc import DeliveredMessage
from pydantic import ValidationError

from producer.batch.answers import (
    Answer,
    Category,
    category_of,
    custom_id_of,
    gateway_block,
)
from producer.batch.files import ResultFiles, ResultSink
from producer.batch.formats import FORMATS, FormatName
from producer.batch.formats import refused as refused_line
from producer.batch.jobs import Check, JobReader, Refused, check_batch_name
from producer.batch.lines import BatchFile
from producer.batch.lock import hold_lock
from producer.batch.resend import Resend, Source
from producer.batch.state import BatchState, CollectState
from producer.batch.submit import Progress
from producer.client import GatewayClient
from queuegate.broker import Incoming, connect, consume, settle
from queuegate.control import NANO, BatchMeta, Counts, job_id
from queuegate.errors import BatchError
from queuegate.messages import ChatResult, ErrorInfo
from queuegate.settings import Settings
from queuegate.signing import ApiKey
from queuegate.topology import MESSAGE_TYPE_RESULT, Topology
from queuegate.visible import clipped, clipped_path

log = logging.getLogger(__name__)

PREFETCH = 1000
"""Results held unacknowledged at once; each round writes up to this many."""
IDLE = 1.0
"""Seconds without a result after which collect checks for expired or canceled requests."""
EXPIRY_GRACE = 5.0
"""Seconds past the deadline before unanswered requests are written ``expired``: a job
started just before the deadline may still be answered."""
RECONCILE_CHUNK = 1000


@dataclass(frozen=True)
class CollectReport:
    name: str
    written: int
    """Lines written by this run."""
    counts: Counts
    refused: int = 0
    """Requests submit's checks refused, each a failed line of its own (not in ``counts``)."""


async def collect(
    settings: Settings,
    name: str,
    out: Path | str,
    errors: Path | str | None = None,
    *,
    team: str,
    user_id: str | None = None,
    api_key: ApiKey | None = None,
    on_progress: Progress | None = None,
    idle: float = IDLE,
    expiry_grace: float = EXPIRY_GRACE,
    source: Path | str | None = None,
    checks: Mapping[FormatName, Check] | None = None,
) -> CollectReport:
    """Write every result of ``team``'s batch ``name`` to ``out`` (failures to ``errors``).

    Returns once every request has a line, then deletes the batch (not the front door's:
    ``BatchMeta.front_door``). Interrupted, it resumes
    where it stopped when run again with the same files. One collect per batch at a time: a
    second one is refused. ``source``: the file the batch was submitted from, where it is
    no longer at the path submit recorded; results its full queue refused are asked for
    again with the jobs it holds, and the requests submit's ``checks`` refused are read
    from it, answered by the same ``checks`` (BatchError without them).
    """
    batch = _batch(settings, name, team, user_id=user_id, api_key=api_key, source=source)
    async with batch as (state, resend):
        with ResultFiles(Path(out), Path(errors) if errors else None) as files:
            where = Path(source) if source is not None else None
            refused = _RefusedLines(state, files, where, checks, settings)
            report = await collect_state(
                settings,
                state,
                files,
                on_progress=on_progress,
                idle=idle,
                expiry_grace=expiry_grace,
                resend=resend,
                held=refused,
            )
        # Read again: a front door's runner that gave the batch up to the team meanwhile
        # cleared it (its answers kept for this collect).
        if not (await state.require()).front_door:
            await state.delete()
    written = report.written + refused.written
    return dataclasses.replace(report, written=written, refused=refused.total)


class _RefusedLines:
    """Writes a failed line for each request submit's checks refused and no earlier run
    wrote, read again from the submitted file, the reason its check gives: called by
    ``collect_state`` once it holds the batch's collect lock, so two collects at once never
    both write them."""

    def __init__(
        self,
        state: BatchState,
        files: ResultFiles,
        source: Path | None,
        checks: Mapping[FormatName, Check] | None,
        settings: Settings,
    ) -> None:
        self._state = state
        self._files = files
        self._source = source
        self._checks = checks
        self._settings = settings
        """Its ``max_job_bytes`` and ``max_job_messages``, which submit refused a request past."""
        self.total = 0
        """Requests refused, each with its line."""
        self.written = 0
        """Their lines written by this run."""

    async def __call__(self) -> None:
        meta = await self._state.require()
        if meta.refused:
            self.total, self.written = await self._answer(meta)

    async def _answer(self, meta: BatchMeta) -> tuple[int, int]:
        """(requests refused, lines written now) of a batch with requests refused."""
        state, files, checks = self._state, self._files, self._checks
        return await _answer_refused(
            state, files, meta, self._source, checks, settings=self._settings
        )


async def _answer_refused(
    state: BatchState,
    files: ResultFiles,
    meta: BatchMeta,
    source: Path | None,
    checks: Mapping[FormatName, Check] | None,
    *,
    settings: Settings,
) -> tuple[int, int]:
    path = source or (Path(meta.source) if meta.source else None)
    if checks is None or path is None or not path.is_file():
        raise BatchError(
            f"batch {meta.name!r} has {meta.refused:,} requests refused at submit, answered "
            "from the file it was submitted from: collect again with --file naming it"
        )
    reader = JobReader.for_meta(
        meta,
        checks=checks,
        max_bytes=settings.max_job_bytes,
        max_messages=settings.max_job_messages,
    )
    file = BatchFile(path)
    found: dict[str, ErrorInfo] = {}
    for _, entry in file:
        try:
            reader.job(entry)
        except Refused as exc:
            found.setdefault(entry["custom_id"], exc.error)
        except ValueError:
            continue  # skipped by submit (--skip-invalid), listed by it
    if file.digest.hexdigest() != meta.fingerprint:
        raise BatchError(
            f"{clipped_path(path)} is not the file batch {meta.name!r} was submitted from: "
            "collect again with --file naming that one"
        )
    # A custom_id one of the batch's requests holds is that request's (submit's index).
    ids = list(found)
    taken = await state.line_numbers(ids)
    refused = {c: found[c] for c, line in zip(ids, taken, strict=True) if line is None}
    total = len(refused)
    async for line in files.existing():
        if "gateway" not in line:
            refused.pop(str(line.get("custom_id")), None)
    for custom_id, error in refused.items():
        files.write(refused_line(meta.format, meta.jobs, custom_id, error), failed=True)
    await files.sync()
    return total, len(refused)


async def collect_into(
    settings: Settings,
    name: str,
    sink: ResultSink,
    *,
    team: str,
    user_id: str | None = None,
    api_key: ApiKey | None = None,
    on_progress: Progress | None = None,
    idle: float = IDLE,
    expiry_grace: float = EXPIRY_GRACE,
    source: Source | None = None,
) -> CollectReport:
    """As ``collect``, into ``sink``; the batch is kept (``delete_batch`` it afterwards), so
    the caller can record the batch as collected before the gateway forgets it.
    ``source``: the submitted file, or how to fetch it should results be asked for again."""
    batch = _batch(settings, name, team, user_id=user_id, api_key=api_key, source=source)
    async with batch as (state, resend):
        return await collect_state(
            settings,
            state,
            sink,
            on_progress=on_progress,
            idle=idle,
            expiry_grace=expiry_grace,
            resend=resend,
        )


async def collect_state(
    settings: Settings,
    state: CollectState,
    sink: ResultSink,
    *,
    unserved: ErrorInfo | None = None,
    on_progress: Progress | None = None,
    idle: float = IDLE,
    expiry_grace: float = EXPIRY_GRACE,
    resend: Resend | None = None,
    held: Callable[[], Awaitable[None]] | None = None,
) -> CollectReport:
    """Collect the batch whose ``state`` is given into ``sink``, the batch kept.

    ``held``: called once the batch's collect lock is held and the lines already in the
    sink are counted, before any result is taken.

    ``resend``: how to ask again for results the full results queue refused; without it
    they are written ``expired`` once the deadline passes.

    ``unserved``: the batch was stopped, and nothing will publish the requests it has not
    published: each is written at once, ``failed`` with this error, rather than awaited.
    The requests it did publish are awaited as ever: every one is answered by a worker, and
    one it answered ``canceled`` (the stop reached it before a provider did) is written
    ``failed`` with this error too, so every unserved line says the same why.
    """
    meta = await state.require()
    run = _Run(state, meta, sink, on_progress, unserved=unserved, resend=resend)
    await _consume(settings, run, idle, expiry_grace, unserved, held=held)
    return CollectReport(meta.name, run.written, await state.counts(meta))


@contextlib.asynccontextmanager
async def _batch(
    settings: Settings,
    name: str,
    team: str,
    *,
    user_id: str | None,
    api_key: ApiKey | None,
    source: Source | str | None,
) -> AsyncIterator[tuple[BatchState, Resend]]:
    """The state of the team's batch ``name``, through a client of the gateway, and how to
    ask again for its results, as the team that submitted it."""
    name = check_batch_name(name)
    async with GatewayClient(
        settings, team=team, user_id=user_id, api_key=api_key, listen=False
    ) as client:
        state = BatchState(client.control, name)
        meta = await state.require()
        resend = Resend(
            client,
            meta,
            reply_to=Topology.of(settings).batch_results_queue(meta),
            max_bytes=settings.reply_queue_max_bytes,
            max_length=settings.reply_queue_max_length,
            source=Path(source) if isinstance(source, str) else source,
        )
        try:
            yield state, resend
        finally:
            await resend.aclose()


async def _consume(
    settings: Settings,
    run: _Run,
    idle: float,
    expiry_grace: float,
    unserved: ErrorInfo | None,
    *,
    held: Callable[[], Awaitable[None]] | None,
) -> None:
    topology = Topology.of(settings)
    connection = await connect(settings.amqp_url, name=f"batch-collect:{run.meta.name}")
    async with connection:
        lock = await run.state.lock()
        if lock is not None:
            await hold_lock(
                connection,
                lock,
                f"batch {run.meta.name!r} is being collected by another process; "
                "wait for it or stop it first",
                retake=True,
            )
        channel: AbstractRobustChannel = await connection.channel()
        inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

        async def take(message: DeliveredMessage) -> None:
            inbox.put_nowait(Incoming(message))

        results = topology.batch_results_queue(run.meta)

        async def consume_results(channel: AbstractRobustChannel | None) -> None:
            if channel is not None:
                await consume(channel, results, take, prefetch=PREFETCH)

        await consume_results(channel)
        channel.reopen_callbacks.add(consume_results)
        await run.reconcile()
        if held is not None:
            await held()
        if unserved is not None:
            await run.unanswerable("failed", unpublished_only=True, error=unserved)
        deadline = run.meta.deadline.timestamp() + expiry_grace
        while run.done < run.meta.total or run.torn:
            messages = await _take(inbox, idle)
            if messages:
                await run.results(messages)
                if run.asked_all_written():
                    await run.ask_again()
            elif time.time() >= deadline:
                await run.unanswerable("expired")
                await run.ask_again()
            elif await run.state.is_canceled():
                await run.unanswerable("canceled", unpublished_only=True)
                await run.ask_again()
            elif run.done < run.meta.total:
                await run.ask_again()
            else:
                # A torn line with no result in the queue, neither expired nor canceled: its
                # result was acknowledged by a run that did not hold it back. It is lost.
                log.warning("lines of %s were torn and cannot be written again", sorted(run.torn))
                return


async def _take(
    inbox: asyncio.Queue[AbstractIncomingMessage], idle: float
) -> list[AbstractIncomingMessage]:
    """What has arrived, waiting up to ``idle`` seconds for the first."""
    # Not asyncio.wait_for: Python 3.11's returns a result that arrives with a cancel and drops
    # the cancel, so a batch runner stopping as a result came went on collecting until the
    # batch ended (minutes, for a team of a low rpm), and held its front door's stop.
    try:
        async with asyncio.timeout(idle):
            first = await inbox.get()
    except TimeoutError:
        return []
    taken = [first]
    while len(taken) < PREFETCH and not inbox.empty():
        taken.append(inbox.get_nowait())
    return taken


class _Run:
    def __init__(
        self,
        state: CollectState,
        meta: BatchMeta,
        files: ResultSink,
        on_progress: Progress | None,
        *,
        unserved: ErrorInfo | None,
        resend: Resend | None,
    ) -> None:
        self.state = state
        self._resend = resend
        self._unserved = unserved
        self.meta = meta
        self._fmt = FORMATS[meta.format]
        self._on_progress = on_progress
        self.files = files
        self.done = 0
        self.written = 0
        self.torn: set[str] = set()
        """custom_ids the gateway counts as written whose line a crash tore: written again."""
        self._held: dict[int, AbstractIncomingMessage] = {}
        """Per file, the unacknowledged result of its last line."""

    async def reconcile(self) -> None:
        """Record lines a crashed run wrote but did not record; learn how many are done."""
        chunk: list[tuple[str, Category, int]] = []
        torn = set(self.files.torn)
        async for line in self.files.existing():
            gateway = line.get("gateway") or {}
            if gateway.get("job_id") != job_id(self.meta.jobs, str(line.get("custom_id"))):
                continue  # another batch's line: not ours to count
            torn.discard(str(line["custom_id"]))
            cost = gateway.get("cost_usd") or 0
            chunk.append((str(line["custom_id"]), self._fmt.category(line), _nano(cost)))
            if len(chunk) >= RECONCILE_CHUNK:
                await self._record_known(chunk)
                chunk = []
        await self._record_known(chunk)
        ids = sorted(torn)
        self.torn = {i for i, w in zip(ids, await self.state.written_among(ids), strict=True) if w}
        self.done = (await self.state.counts(self.meta)).written
        self._progress()

    async def _record_known(self, chunk: list[tuple[str, Category, int]]) -> None:
        unique = {entry[0]: entry for entry in chunk}
        ids = list(unique)
        known = await self.state.written_among(ids)
        await self.state.mark_written([unique[i] for i, k in zip(ids, known, strict=True) if not k])

    async def results(self, messages: Sequence[AbstractIncomingMessage]) -> None:
        answers: dict[str, Answer] = {}
        sources: dict[str, AbstractIncomingMessage] = {}
        for message in messages:
            if message.type != MESSAGE_TYPE_RESULT:
                continue
            if self._resend is not None:
                self._resend.saw(len(message.body))
            try:
                result = ChatResult.model_validate_json(message.body)
            except ValidationError:
                log.warning("dropped a malformed result %s", message.message_id)
                continue
            custom_id = custom_id_of(self.meta.jobs, result.job_id)
            if custom_id is not None and custom_id not in answers:
                answers[custom_id] = self._answer(custom_id, result)
                sources[custom_id] = message
        last = await self._write(list(answers.values()))
        # Lines are on disk and recorded before this ack: redelivered results are skipped.
        # Each file's last line keeps its result unacknowledged: a torn tail is written again.
        released = [self._held.pop(index) for index in last if index in self._held]
        self._held.update({index: sources[custom_id] for index, custom_id in last.items()})
        held = {id(m) for m in self._held.values()}
        await self._ack([*released, *(m for m in messages if id(m) not in held)])

    def asked_all_written(self) -> bool:
        return self._resend is not None and self._resend.ready

    async def ask_again(self) -> None:
        """The queue ran dry with requests published and unanswered: ask for the results
        it may have refused."""
        if self._resend is not None and self.done < self.meta.total:
            await self._resend.again()

    def _answer(self, custom_id: str, result: ChatResult) -> Answer:
        category = category_of(result)
        if category == "canceled" and self._unserved is not None:
            # The batch was stopped (its key revoked), not canceled by its caller: the
            # worker's ``canceled`` only says the stop reached the job first.
            return Answer(custom_id, result.job_id, "failed", error=self._unserved)
        return Answer(custom_id, result.job_id, category, result)

    async def _ack(self, messages: Sequence[AbstractIncomingMessage]) -> None:
        # One after another: an ack only writes a frame, and each is made as it is awaited, so
        # a collect cancelled here (Ctrl-C) leaves no ack made and never awaited (a gather's
        # were, and Python warned of each).
        for message in messages:
            await settle(message.ack(), "acknowledge results", log)

    async def unanswerable(
        self,
        category: Category,
        *,
        unpublished_only: bool = False,
        error: ErrorInfo | None = None,
    ) -> None:
        """Write ``category`` (with ``error``, why it was not served) for every request still
        without a line (``unpublished_only``: those never published), but those the gateway
        answered or is answering, where they can be asked for again."""

        def answer(custom_id: str) -> Answer:
            return Answer(custom_id, job_id(self.meta.jobs, custom_id), category, error=error)

        async for chunk in self.state.unwritten():
            ids = [c for c, published in chunk if not (unpublished_only and published)]
            if self._resend is not None:
                coming = await self._resend.answered(ids)
                ids = [c for c in ids if c not in coming]
            await self._settled([answer(c) for c in ids])
        # Every other line written and still no result for a torn one (its result comes back
        # at once when there is one): it was one of these, never answered by a worker.
        if self.torn and self.done >= self.meta.total:
            await self._settled([answer(c) for c in self.torn])

    async def _settled(self, answers: list[Answer]) -> None:
        """Write answers that have no result: a file's line before them needs no holding."""
        last = await self._write(answers)
        await self._ack([self._held.pop(index) for index in last if index in self._held])

    async def _write(self, answers: list[Answer]) -> dict[int, str]:
        """Write the answers not written yet (and torn ones again); per file written to, the
        custom_id of its new last line."""
        if not answers:
            return {}
        written = await self.state.written_among([a.custom_id for a in answers])
        fresh = [
            a for a, w in zip(answers, written, strict=True) if not w or a.custom_id in self.torn
        ]
        if not fresh:
            return {}
        entries: list[tuple[str, Category, int]] = []
        last: dict[int, str] = {}
        for answer in fresh:
            line = self._line(answer)
            # What the line says, as a resumed collect reads it back (``reconcile``): an
            # answer its format cannot hold is written as an error, and counted as one.
            category = self._fmt.category(line)
            last[self.files.write(line, failed=category != "done")] = answer.custom_id
            if answer.custom_id in self.torn:
                continue  # counted when first written
            entries.append((answer.custom_id, category, _nano(line["gateway"]["cost_usd"])))
        await self.files.sync()
        await self.state.mark_written(entries)
        if self._resend is not None:
            self._resend.written(a.custom_id for a in fresh)
        self.torn.difference_update(a.custom_id for a in fresh)
        self.done += len(entries)
        self.written += len(fresh)
        self._progress()
        return last

    def _line(self, answer: Answer) -> dict[str, Any]:
        """The answer's line, with how the gateway served it. An answer the batch's format
        fails on (a fault of ours, not of its request) is written errored, saying why,
        rather than failing the round: the round's other answers, served and paid for, are
        kept, and this one, served and billed too (its gateway block says so), is not
        served again."""
        try:
            line = self._fmt.line(answer)
        except Exception as exc:
            log.exception(
                "batch %s: the answer to %s could not be written; written as an error",
                self.meta.name,
                answer.custom_id,
            )
            why = ErrorInfo(
                code="internal_error",
                message=f"the gateway could not write its answer ({type(exc).__name__}: "
                f"{clipped(str(exc))}); it was served and billed, and is not served again",
            )
            line = self._fmt.line(
                dataclasses.replace(answer, category="failed", result=None, error=why)
            )
        line["gateway"] = gateway_block(answer)
        return line

    def _progress(self) -> None:
        if self._on_progress is not None:
            self._on_progress(self.done, self.meta.total)


def _nano(cost: object) -> int:
    with contextlib.suppress(ArithmeticError, ValueError, TypeError):
        return int(Decimal(str(cost)) * NANO)
    return 0
