"""The worker's side of the control plane: what a team's app asks, done for the proven team.

Every worker consumes the ``<ns>.control.<team>`` of each team it serves or the registry
holds, a few requests at a time (``PREFETCH``), so a team flooding its own queue holds at
most those slots, each request waiting its turn by what it costs (workers/control_pace.py).
A request is answered, and carried out, only when its ``reply_to`` is a
direct reply-to name: the answer goes out under the worker's identity on the default
exchange, where any other name could be another team's queue, on the team's own connection
(``TeamConnections``: a name the broker cannot decode closes the connection it is published
on). It is proven like a job
(``Identities.prove``: broker ``user_id``, API key, operator), its team taken from the
routing key (``<team>.control``, which the broker lets only that team's user publish).
Reply and results queues are declared here, with the gateway's arguments only (an expiry,
and a bound in results and bytes past which the broker refuses the next result), at most
``settings.reply_queues_per_team`` per team; batch state is read and written under the
team's own keys. See queuegate/control.py for the requests.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Annotated, Any, Protocol, TypeVar, cast

import aiormq
import orjson
import redis.asyncio as aioredis
from aio_pika.abc import AbstractRobustChannel
from aiormq.abc import AbstractChannel, DeliveredMessage
from pydantic import Field, StringConstraints, TypeAdapter, ValidationError
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from queuegate.broker import Consumer, Incoming, consume, json_message, settle
from queuegate.control import (
    BATCH_ERROR,
    BATCH_IDS_PER_HOUR,
    CONTROL_BODY_MAX,
    CONTROL_WAIT,
    DIRECT_REPLY_TO,
    HEADER_REQUEST,
    MAX_CUSTOM_ID,
    MESSAGE_TYPE_CONTROL_REPLY,
    REQUEST_ID,
    STEP_MAX,
    TEAM_DISABLED,
    BatchCall,
    BatchLockRole,
    BatchMeta,
    BatchSummary,
    Category,
    CloseReplyQueue,
    ControlRequest,
    ControlResponse,
    OpenReplyQueue,
)
from queuegate.errors import (
    BatchError,
    ConfigError,
    GatewayError,
    JobError,
    ServiceUnavailable,
)
from queuegate.header_bound import check_headers_read, header_bytes
from queuegate.keys import Keys
from queuegate.redis_client import lua_source, text
from queuegate.settings import Settings
from queuegate.topology import Bound, Topology
from queuegate.visible import clipped
from workers.batch_state import BatchState, list_batches
from workers.control_pace import REQUEST_COST, Pace
from workers.identity import Identities
from workers.team_connections import TeamConnections

log = logging.getLogger(__name__)

PREFETCH = 4
"""Control requests of one team taken at once: all a team's flood can hold of a worker."""
FIRST_COPY_WAIT = 0.25
"""Seconds a worker asks Redis whether a request's copy is the first (1 ms here)."""
MARKED_FOR = int(CONTROL_WAIT) + 60
"""Seconds a request's first copy stays marked: past its client's wait, a copy is dropped
as waited out anyway (``_waited_out``)."""
LOG_INTERVAL = 60.0
"""Seconds between two log lines of one kind about one team's control requests."""
LOCK_EXPIRES = 60.0
"""Seconds a batch's lock queue outlives its collector or submitter."""
DECLARING_FOR = 60.0
"""Seconds a reply queue being declared keeps its slot from reclaim (lua/reply_reclaim.lua)
at most, should its worker die before saying the declare is over."""

_CUSTOM_ID = Annotated[str, StringConstraints(max_length=MAX_CUSTOM_ID)]
_IDS = TypeAdapter(Annotated[list[_CUSTOM_ID], Field(max_length=STEP_MAX)])
_INDEX = TypeAdapter(Annotated[list[tuple[_CUSTOM_ID, int]], Field(max_length=STEP_MAX)])
_WRITTEN = TypeAdapter(
    Annotated[list[tuple[_CUSTOM_ID, Category, int]], Field(max_length=STEP_MAX)]
)
_CURSOR = TypeAdapter(int)
_LOCK_ROLE: TypeAdapter[BatchLockRole] = TypeAdapter(BatchLockRole)
_META = TypeAdapter(BatchMeta)
_RUN = TypeAdapter(Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{0,16}$")])
"""A submit's own token (``producer.batch.state``): part of a Redis key."""


class Refused(GatewayError):
    """A control request the gateway will not carry out; the message says why."""


class ControlPlane:
    """Consumes the teams' control queues on its own channel and answers each request::

    control = ControlPlane(settings, redis, identities, answers=team_connections)
    await control.start(await connection.channel())
    await control.serve(["search", "ads"])
    """

    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        identities: Identities,
        *,
        answers: TeamConnections,
    ) -> None:
        self._settings = settings
        self._redis = redis
        self._identities = identities
        self._keys = Keys(settings.redis_prefix)
        self._topology = Topology.of(settings)
        self._channel: AbstractRobustChannel | None = None
        self._served: dict[str, Consumer] = {}
        self._disabled: frozenset[str] = frozenset()
        self._logged: dict[tuple[str, str], float] = {}
        self._paces: defaultdict[str, Pace] = defaultdict(Pace)
        """Each team's turn for its next control request (workers/control_pace.py)."""
        self._reply_slot: AsyncScript = redis.register_script(lua_source("workers", "reply_slot"))
        self._reply_reclaim: AsyncScript = redis.register_script(
            lua_source("workers", "reply_reclaim")
        )
        self._bound = Bound.of(settings)
        self._answers = answers
        """Where each team's answers go: a request is consumed and acknowledged here, on
        the worker's own connection, so one whose answer closes the team's connection is not
        delivered again."""

    async def start(self, channel: AbstractRobustChannel) -> None:
        self._channel = channel
        # Bound under *.control, it would take a copy of every request and, once full, have
        # the broker refuse them all.
        await channel.queue_delete(self._topology.shared_control_queue)
        channel.reopen_callbacks.add(self._on_reopen)

    async def serve(
        self, teams: Iterable[str], *, only: bool = True, disabled: Iterable[str] = ()
    ) -> None:
        """Consume the control queues of ``teams`` (declared first); ``only``: stop
        consuming those of other teams. Those of the ``disabled`` teams too, each request
        refused saying so: left unconsumed, their apps waited 30 s to be told that no
        gateway answered, and to check that workers run."""
        channel = self._require_channel()
        self._disabled = frozenset(disabled)
        wanted = set(teams) | self._disabled
        for team in sorted(wanted - set(self._served)):
            await self._topology.declare_control_queue(channel, team)
            self._served[team] = await self._consume(channel, team)
        for team in set(self._served) - wanted if only else ():
            await self._served.pop(team).cancel()
            self._paces.pop(team, None)

    async def _consume(self, channel: AbstractRobustChannel, team: str) -> Consumer:
        async def on_request(delivered: DeliveredMessage) -> None:
            await self._on_request(team, delivered)

        return await consume(
            channel, self._topology.control_queue(team), on_request, prefetch=PREFETCH
        )

    async def _on_reopen(self, channel: AbstractRobustChannel | None) -> None:
        if channel is not None:
            for team in list(self._served):
                self._served[team] = await self._consume(channel, team)

    async def _on_request(self, team: str, delivered: DeliveredMessage) -> None:
        """Answer a request in ``team``'s control queue, for that team: never for the one its
        routing key names, which a ``CC`` header's copy does not have (it keeps the key it
        was published under)."""
        pace = self._paces[team]
        wait = pace.wait(len(delivered.body) + header_bytes(delivered.header))
        if wait > 0:
            # Info: a large batch's collect may wait its turn too.
            self._once(
                logging.INFO,
                team,
                "paced",
                "control requests of team %s wait their turn: more than %s a second of "
                "requests and answers, or queues looked up (said once per %.0f s)",
                f"{pace.rate / 1e6:g} MB",
            )
            await asyncio.sleep(wait)
        message = Incoming(delivered)
        reply_to = message.reply_to
        request = _request_of(message)
        if _waited_out(message):
            self._dropped(team, "their clients stopped waiting (a worker held them)")
        elif request is not None and not await self._first_copy(
            team, request, message.message_id or ""
        ):
            # A copy run late by a worker that held it (stopped) would act after its client
            # had moved on: an open after its close left a queue taking one of the team's
            # slots for 5 minutes, 1-4 slots a stall in an attack.
            log.info(
                "a copy of team %s's control request %s dropped: another was taken first",
                team,
                request,
            )
        elif reply_to is not None and _is_direct_reply_to(reply_to):
            response = await self._answer(message, team)
            answer = response.model_dump_json().encode()
            # Its answer too: a step of a few bytes (``unwritten``) scans 1,000 ids and
            # answers 76 KB, and charged by its request alone, a flood of them took another
            # team's p50 from 4.4 to 15.9 ms.
            pace.charge(len(answer))
            reply = json_message(
                answer,
                message_type=MESSAGE_TYPE_CONTROL_REPLY,
                correlation_id=message.correlation_id,
                persistent=False,
            )
            try:
                await self._answers.send(team, reply_to, reply)
            except (ServiceUnavailable, aiormq.exceptions.AMQPError) as exc:
                # Delivered again (up to the queue's delivery limit), and answered then.
                log.info("could not answer control request %s (%s)", message.message_id, exc)
                assert delivered.delivery_tag is not None
                await settle(
                    delivered.channel.basic_reject(delivered.delivery_tag, requeue=True),
                    "return an unanswered control request",
                    log,
                )
                return
        else:
            self._dropped(team, f"reply_to {message.reply_to!r} is not {DIRECT_REPLY_TO}")
        assert delivered.delivery_tag is not None
        await settle(
            delivered.channel.basic_ack(delivered.delivery_tag),
            "acknowledge a control request",
            log,
        )

    async def _first_copy(self, team: str, request: str, copy: str) -> bool:
        """Whether ``copy`` is the first copy of ``request`` a worker takes (or that copy
        delivered again: one whose answer could not be sent comes back to be answered),
        marking it taken for as long as its client waits. Best effort, and within
        ``FIRST_COPY_WAIT``: Redis failing or slow, it is carried out as before copies were
        sent (its own steps then say Redis is unavailable, which an extra wait of Redis's
        timeout only delayed)."""
        key = self._keys.control_answered(team, request)
        try:
            async with asyncio.timeout(FIRST_COPY_WAIT):
                if await self._redis.set(key, copy, nx=True, ex=MARKED_FOR):
                    return True
                return text(await self._redis.get(key)) == copy
        except (RedisError, TimeoutError):
            return True

    def _dropped(self, team: str, why: str) -> None:
        """Say, once per team and ``LOG_INTERVAL``, that requests were dropped,
        unanswered and not carried out, and ``why``.

        A ``reply_to`` other than direct reply-to: the worker publishes its answer under its
        own identity, on the default exchange, so sent there it would land in whatever queue
        a team names (another team's jobs or results, accounting, the dead letters). A
        request whose client stopped waiting (``_waited_out``): told it failed, the client
        may have done the step again or undone it since.
        """
        self._once(
            logging.WARNING,
            team,
            "dropped",
            "control requests of team %s dropped unanswered: %s (said once per %.0f s)",
            why,
        )

    def _once(self, level: int, team: str, what: str, line: str, detail: str) -> None:
        """Log ``line`` (of the team, ``detail`` and the interval) at ``level``, once per
        team, ``what`` and ``LOG_INTERVAL``: a flood would write one a request."""
        now = time.monotonic()
        key = (team, what)
        if now - self._logged.get(key, -LOG_INTERVAL) < LOG_INTERVAL:
            return
        self._logged[key] = now
        log.log(level, line, team, detail, LOG_INTERVAL)

    async def _answer(self, message: Incoming, team: str) -> ControlResponse:
        try:
            check_headers_read(message.headers)
            await self._identities.prove(
                message, team, message.message_id or "", check_reply_to=False
            )
            if team in self._disabled:
                # Once proven: only the team's own credentials learn it. Not logged: the
                # operator knows, and a disabled team's app retrying wrote thousands of lines
                # a minute.
                return _error(
                    TEAM_DISABLED,
                    f"team {team} is disabled: ask an operator to enable it again "
                    f"(queuegate teams add {team})",
                )
            if len(message.body) > CONTROL_BODY_MAX:
                return _error(
                    "invalid_request",
                    f"a control request of {len(message.body):,} bytes is larger than the "
                    f"{CONTROL_BODY_MAX:,} a worker reads: send a batch step's custom ids "
                    f"{STEP_MAX:,} at a time",
                )
            request = ControlRequest.model_validate_json(message.body).request
            return ControlResponse(ok=True, result=await self._do(team, request))
        except ValidationError as exc:
            return _error("invalid_request", f"not a valid control request: {exc.errors()[0]}")
        except JobError as exc:
            log.info("control request %s refused: %s", clipped(message.message_id or ""), exc)
            return _error(exc.code, str(exc))
        except BatchError as exc:
            return _error(BATCH_ERROR, str(exc))
        except (Refused, ConfigError) as exc:
            return _error("invalid_request", str(exc))
        except ServiceUnavailable as exc:
            return _error("service_unavailable", str(exc))
        except RedisError as exc:
            # Reply queues are counted and batches kept in Redis: say so, or the client
            # would blame the workers.
            log.warning("control request %s failed: Redis: %s", message.message_id, exc)
            return _error(
                "service_unavailable",
                f"the gateway's Redis is unavailable ({type(exc).__name__}: {exc}): try again "
                "once it answers (queuegate status shows it)",
            )
        except (OSError, aiormq.exceptions.AMQPError) as exc:
            log.warning("control request %s failed: %s", message.message_id, exc)
            return _error("service_unavailable", f"the gateway could not do it ({exc}); retry")
        except Exception:
            # A request must never take the consumer down nor stay unanswered.
            log.exception("control request %s failed", message.message_id)
            return _error("internal", "the gateway failed on this request; see its log")

    async def _do(self, team: str, request: Any) -> Any:
        if isinstance(request, OpenReplyQueue):
            return await self._open(team, request.name, durable=request.durable)
        if isinstance(request, CloseReplyQueue):
            batch = (
                await BatchState(self._redis, self._keys, team, request.name, "").load()
                if request.durable
                else None
            )
            if batch is not None and not batch.own_queue:
                # A batch recorded before batches had queues of their own: its results are
                # in this one. It would stay, its paid results gone and its collect failing.
                raise Refused(
                    f"{request.name!r} is the results queue of batch {request.name!r}: "
                    f"run queuegate batch delete {request.name} to drop the batch with it"
                )
            return await self._close(team, request.name, durable=request.durable)
        assert isinstance(request, BatchCall)
        return await self._batch(team, request)

    async def _open(self, team: str, name: str, *, durable: bool) -> str:
        s = self._settings
        channel = self._require_channel()
        expires = s.results_queue_expires if durable else s.reply_queue_expires
        full = (
            self._topology.results_queue(team, name)
            if durable
            else self._topology.replies_queue(team, name)
        )
        new = await self._count(team, full, expires)
        try:
            if durable:
                await self._topology.declare_results_queue(
                    channel, team, name, expires_s=expires, bound=self._bound
                )
            else:
                await self._topology.declare_replies_queue(
                    channel, team, name, expires_s=expires, bound=self._bound
                )
        except BaseException:
            if new:
                # No queue came of the slot: give it back, or failed declares would use up
                # the team's limit until they expire.
                await self._redis.zrem(self._keys.reply_queues(team), full)
            raise
        finally:
            await self._redis.zrem(self._keys.reply_queues_opening(team), full)
        return full

    async def _count(self, team: str, queue: str, expires: float) -> bool:
        """Count the queue against the team's limit (lua/reply_slot.lua, one step, so
        concurrent opens cannot all fit under it); Refused past it, once the slots of the
        team's queues the broker no longer has are given back. True when it took a new
        slot, False when it was counted already.

        A queue counts until it may have expired (its last open plus its expiry), so one a
        client still uses is counted again when it asks for it after a reconnect.
        """
        status, count = await self._take_slot(team, queue, expires)
        if status < 0 and await self._reclaim(team):
            status, count = await self._take_slot(team, queue, expires)
        if status < 0:
            raise Refused(
                f"team {team!r} has {count} reply queues, its limit: delete one it no longer "
                "needs (queuegate replies delete NAME) or let them expire before opening another"
            )
        return status == 1

    async def _take_slot(self, team: str, queue: str, expires: float) -> tuple[int, int]:
        now = time.time()
        ttl = int(max(expires, self._settings.results_queue_expires)) + 60
        status, count = await self._reply_slot(
            keys=[self._keys.reply_queues(team), self._keys.reply_queues_opening(team)],
            args=[
                queue,
                now,
                now + expires,
                self._settings.reply_queues_per_team,
                ttl,
                now + DECLARING_FOR,
            ],
        )
        return int(status), int(count)

    async def _reclaim(self, team: str) -> int:
        """Give back the slots of the team's counted queues that the broker no longer has,
        found by a passive declare of each; how many. A queue deleted out of band (by an
        operator, lost with a node, expired while its slot still counted it) would otherwise
        hold its slot until the slot's own expiry, 8 days for a results queue, and lock the
        team out of new queues. Only the team's own slots are looked at."""
        key = self._keys.reply_queues(team)
        counted = cast(
            list[tuple[bytes | str, float]], await self._redis.zrange(key, 0, -1, withscores=True)
        )
        depths = await self._depths(team, [text(member) for member, _ in counted])
        gone: list[str | float] = [
            value
            for (member, score), depth in zip(counted, depths, strict=True)
            if depth is None
            for value in (text(member), score)
        ]
        if not gone:
            return 0
        freed = await self._reply_reclaim(
            keys=[key, self._keys.reply_queues_opening(team)], args=[time.time(), *gone]
        )
        log.info("team %s: gave back %d reply-queue slots of queues deleted", team, int(freed))
        return int(freed)

    async def _close(self, team: str, name: str, *, durable: bool) -> int | None:
        """Delete one of the team's queues, its name always under the team's own prefix, and
        give back its slot; how many results unread went with it, None when the team had no
        such queue (deleting one is no error to the broker, which would say it was)."""
        queue = (
            self._topology.results_queue(team, name)
            if durable
            else self._topology.replies_queue(team, name)
        )
        if (await self._depths(team, [queue]))[0] is None:
            await self._redis.zrem(self._keys.reply_queues(team), queue)
            return None
        deleted = await self._require_channel().queue_delete(queue)
        await self._redis.zrem(self._keys.reply_queues(team), queue)
        return int(deleted.message_count or 0)

    def _require_channel(self) -> AbstractRobustChannel:
        assert self._channel is not None, "start() first"
        return self._channel

    async def _batch(self, team: str, call: BatchCall) -> Any:
        if call.call == "list":
            batches = await list_batches(self._redis, self._keys, team)
            waiting = await self._waiting(team, [meta for meta, _ in batches])
            return [
                BatchSummary.of(meta, counts, n).model_dump(mode="json")
                for (meta, counts), n in zip(batches, waiting, strict=True)
            ]
        if not call.batch:
            raise Refused(f"batch {call.call} needs a batch name")
        state = BatchState(self._redis, self._keys, team, call.batch, _arg(call, "run", _RUN, ""))
        match call.call:
            case "load":
                meta = await state.load()
                return None if meta is None else meta.model_dump(mode="json")
            case "create":
                new = _arg(call, "meta", _META).model_copy(
                    update={"team": team, "name": call.batch}
                )
                return await state.create(
                    new, lambda: self._open(team, new.reply_name, durable=True)
                )
            case "reset_index":
                await state.reset_index()
                return None
            case "index":
                entries = _arg(call, "entries", _INDEX)
                await self._charge(team, len(entries))
                return await state.index(entries)
            case "is_canceled":
                return await state.is_canceled()
        # Every other step is on a recorded batch, whose expiry its keys then take: its record
        # read once, here, for the steps that need it.
        meta = await state.require()
        match call.call:
            case "line_numbers":
                return await state.line_numbers(_arg(call, "ids", _IDS))
            case "published_among":
                return await state.published_among(_arg(call, "ids", _IDS))
            case "written_among":
                return await state.written_among(_arg(call, "ids", _IDS))
            case "outcomes_among":
                return await state.outcomes_among(meta, _arg(call, "ids", _IDS))
            case "mark_published":
                ids = _arg(call, "ids", _IDS)
                await self._charge(team, len(ids))
                await state.mark_published(ids)
                return None
            case "mark_written":
                written = _arg(call, "entries", _WRITTEN)
                await self._charge(team, len(written))
                await state.mark_written(written)
                return None
            case "unwritten":
                return await state.unwritten(_arg(call, "cursor", _CURSOR, 0))
            case "cancel":
                await state.cancel()
                return await self._status(state, meta)
            case "counts":
                return (await state.counts(meta)).model_dump(mode="json")
            case "status":
                return await self._status(state, meta)
            case "lock":
                lock = await self._topology.declare_batch_lock(
                    self._require_channel(),
                    team,
                    call.batch,
                    _arg(call, "role", _LOCK_ROLE, "collect"),
                    expires_s=LOCK_EXPIRES,
                )
                return lock.name
            case "delete":
                _check_not_front_doors(meta)
                await self._check_answered(state, meta)
                await self._close(team, meta.reply_name, durable=True)
                await state.delete()
                return None
        raise Refused(f"unknown batch call {call.call!r}")  # pragma: no cover - Literal

    async def _charge(self, team: str, ids: int) -> None:
        """Count ``ids`` custom ids a batch step of ``team`` is about to record against its
        hour (``BATCH_IDS_PER_HOUR``); Refused past it, nothing counted nor recorded."""
        now = time.time()
        hour = int(now // 3600)
        key = self._keys.batch_ids(team, hour)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incrby(key, ids)
            pipe.expire(key, 7200)
            total, _ = await pipe.execute()
        if int(total) > BATCH_IDS_PER_HOUR:
            await self._redis.decrby(key, ids)
            minutes = math.ceil(((hour + 1) * 3600 - now) / 60)
            raise Refused(
                f"team {team}'s batch steps recorded {BATCH_IDS_PER_HOUR:,} custom ids this "
                f"hour, the most a team may: go on in {minutes} minutes (the hour's end)"
            )

    async def _check_answered(self, state: BatchState, meta: BatchMeta) -> None:
        """Refuse to delete a batch whose published requests are not all answered.

        Deleted, its jobs still queued or held for the team's rate would be called and
        billed all the same, their answers sent to a queue gone with it. Canceling first,
        here, is not safe: the cancel flag is the batch name's, so it would have to outlive
        the record (delete drops it with the rest, or the jobs are served) and would then
        cancel a batch submitted again under the name. After ``batch cancel`` its jobs are
        answered ``canceled`` within a second or so, and the batch can go."""
        left = (await state.counts(meta)).unanswered((await self._waiting(state.team, [meta]))[0])
        if left:
            raise Refused(
                f"batch {meta.name!r} has {left:,} requests not answered yet, which workers "
                f"would still call and bill: cancel it first (queuegate batch cancel "
                f"{meta.name}), then delete it once batch status shows none queued"
            )

    async def _status(self, state: BatchState, meta: BatchMeta) -> dict[str, Any]:
        counts = await state.counts(meta)
        return {
            "meta": meta.model_dump(mode="json"),
            "counts": counts.model_dump(mode="json"),
            "waiting": counts.to_collect((await self._waiting(state.team, [meta]))[0]),
        }

    async def _waiting(self, team: str, batches: Sequence[BatchMeta]) -> list[int]:
        """Results in each batch's results queue: answered, not collected yet."""
        queues = [self._topology.batch_results_queue(meta) for meta in batches]
        return [depth or 0 for depth in await self._depths(team, queues)]

    async def _depths(self, team: str, queues: Sequence[str]) -> list[int | None]:
        """Messages ready in each of ``queues`` of ``team``; None for one the broker has
        not. Each looked up is charged to the team's pace as a request: a reclaim or a
        ``batch list`` looks up every queue the team has.

        Looked up by passive declares on one channel of their own, not the consumers': the
        broker closes a channel on a passive declare of a missing queue, so another is opened
        only after one was missing."""
        self._paces[team].charge(REQUEST_COST * len(queues))
        connection = (await self._require_channel().get_underlay_channel()).connection
        depths: list[int | None] = []
        probe: AbstractChannel | None = None
        try:
            for queue in queues:
                if probe is None:
                    probe = await connection.channel()
                try:
                    ok = await probe.queue_declare(queue, passive=True)
                except aiormq.exceptions.ChannelNotFoundEntity:
                    depths.append(None)
                    probe = None  # closed by the broker with its refusal
                else:
                    depths.append(int(ok.message_count or 0))
        finally:
            if probe is not None and not probe.is_closed:
                await probe.close()
        return depths


def _check_not_front_doors(meta: BatchMeta) -> None:
    """Refuse to delete a batch the HTTP front door runs: it would end it ``failed``, lost,
    its counts not adding up and the lines the team's collect took in no file of it. Its
    runner clears ``front_door`` (``BatchState.hand_over``, in Redis, which no team reaches)
    before it deletes a batch it ended, or when it gives one up to the team."""
    if meta.front_door:
        path = "/v1/batches" if meta.format == "openai" else "/v1/messages/batches"
        raise Refused(
            f"batch {meta.name!r} is run by the HTTP front door, which deletes it once it "
            f"ends it: cancel it there (POST {path}/{meta.name}/cancel) rather than delete it"
        )


def _is_direct_reply_to(reply_to: str) -> bool:
    # What the broker hands the consumer is the name with the requester's channel appended.
    return reply_to.startswith(DIRECT_REPLY_TO + ".")


def _request_of(message: Incoming) -> str | None:
    """The request the message is a copy of (``HEADER_REQUEST``), if it names a well-formed one."""
    request = message.headers.get(HEADER_REQUEST)
    return request if isinstance(request, str) and re.fullmatch(REQUEST_ID, request) else None


def _waited_out(message: Incoming) -> bool:
    """Whether the request's client has stopped waiting for it: sent (``timestamp``, whole
    seconds, so up to a second early) more than its time to live (``expiration``, the wait
    its client had left) ago. The broker drops such a request only while it waits in the
    queue; one that a worker took and held (stopped, its loop hung) was run when the worker
    resumed, after its client had been told that no gateway answered: in an attack, batch
    deletes and named results queues' deletes reported failed ran 45 s later, removing the
    batches and the queue opened again since, with their paid answers."""
    ttl = message.expiration  # seconds, as aio-pika decodes it
    if message.timestamp is None or not isinstance(ttl, int | float):
        return False
    return message.timestamp.timestamp() + ttl <= time.time()


def _error(code: str, text: str) -> ControlResponse:
    return ControlResponse(ok=False, code=code, error=text)


T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class _Validator(Protocol[T_co]):
    """A TypeAdapter, as ``_arg`` reads one: covariant, so a list's serves for a Sequence."""

    def validate_json(self, value: bytes, /) -> T_co: ...


_REQUIRED: Any = object()
"""An argument a batch step has no default for."""


def _arg(call: BatchCall, name: str, adapter: _Validator[T], default: Any = _REQUIRED) -> T:
    """Argument ``name`` of a batch step; Refused, naming it, when it is missing or invalid
    (a bad request, not the gateway failing)."""
    value = call.args.get(name, default)
    if value is _REQUIRED:
        raise Refused(f"batch {call.call} needs argument {name!r}; it was not sent")
    try:
        # Read as from its text (see messages.decoded): a strict model's datetime is ISO text.
        return adapter.validate_json(orjson.dumps(value))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in (name, *first["loc"]))
        raise Refused(f"batch {call.call}: argument {where} is not valid: {first['msg']}") from None
