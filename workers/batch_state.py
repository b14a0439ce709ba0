"""A batch's state in Redis: what it is, which jobs the broker confirmed, which results are
on disk, and its running counts. Every key carries the batch's team and expires a week after
the batch's deadline. Only the gateway touches it, for the team a control request proved
(workers/control.py); a team's own tools never reach Redis.

Submit writes ``lines`` (custom_id → line number, the valid requests) and ``published``;
collect writes ``written`` and the counts. A custom_id enters ``published`` only after the
broker's confirm and ``written`` only after its line is fsynced, so after any crash a re-run
publishes or writes again at most what was in flight, and drops the duplicates by custom_id.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError, WatchError

from queuegate.control import (
    CATEGORIES,
    NANO,
    BatchMeta,
    Category,
    Counts,
    Outcome,
    being_submitted,
    job_id,
    no_such_batch,
)
from queuegate.errors import BatchError, ServiceUnavailable
from queuegate.keys import Keys
from queuegate.redis_client import lua_source, text

KEEP_S = 7 * 24 * 3600
"""Seconds a batch's state outlives its deadline."""
SCRIPT_SHARE = 250
"""Requests of a step one script call takes: a call holds every other client of Redis
while it runs, about 1 ms for 250 new custom ids (lua/batch_index.lua)."""
_SCRIPTS: weakref.WeakKeyDictionary[aioredis.Redis, tuple[AsyncScript, AsyncScript]] = (
    weakref.WeakKeyDictionary()
)
"""Each Redis client's lua/batch_index.lua and lua/batch_outcomes.lua, made once: a batch
state is made for each control request."""
_OUTCOME: tuple[Outcome | None, ...] = (None, "stored", "held")
"""What lua/batch_outcomes.lua's answers stand for."""


class BatchState:
    """One batch's keys. Of two submits of one new batch at once, one records it and the other
    stops (``create``)."""

    def __init__(
        self, client: aioredis.Redis, keys: Keys, team: str, name: str, run: str = ""
    ) -> None:
        self._r = client
        self._keys = keys
        self.team = team
        self.name = name
        self._batches = keys.batches(team)
        self._meta = keys.batch(team, name)
        self._lines = keys.batch_lines(team, name)
        self._run = run
        self._index = keys.batch_index(team, name, run)
        self._published = keys.batch_published(team, name)
        self._written = keys.batch_written(team, name)
        self._canceled = keys.batch_canceled(team, name)
        self._expire_at: int | None = None

    async def load(self) -> BatchMeta | None:
        raw = await self._call(self._r.hgetall(self._meta))
        fields = {text(k): text(v) for k, v in raw.items()}
        if "team" not in fields:
            return None
        # Validated as a dict: the recorded format is text, which the model checks is one.
        meta = BatchMeta.model_validate(
            {
                "name": self.name,
                "team": fields["team"],
                "format": fields["format"],
                "total": int(fields["total"]),
                "deadline": datetime.fromtimestamp(float(fields["deadline"]), UTC),
                "fingerprint": fields["fingerprint"],
                "submission": fields.get("submission", ""),
                "model": fields.get("model") or None,
                "source": fields.get("source", ""),
                "own_queue": fields.get("own_queue") == "1",
                "front_door": fields.get("front_door") == "1",
                "refused": int(fields.get("refused", 0)),
            }
        )
        self._expire_at = int(meta.deadline.timestamp()) + KEEP_S
        return meta

    async def require(self) -> BatchMeta:
        meta = await self.load()
        if meta is None:
            raise BatchError(no_such_batch(self.team, self.name))
        return meta

    async def create(self, meta: BatchMeta, declare: Callable[[], Awaitable[object]]) -> str:
        """Record a new batch, and adopt the validated index as its lines; the submission
        the batch is recorded with. Sent again (its answer lost with a connection), it finds
        the batch recorded and leaves it be; another submit of the name that recorded it
        first keeps it (its submission is returned: the caller must not publish its own, or
        each request would go out under two job ids, called and billed twice).

        ``declare`` (its results queue) is awaited once the request is found good, before
        the batch is recorded: one refused (no index of its run) leaves nothing behind."""
        self._expire_at = int(meta.deadline.timestamp()) + KEEP_S
        mapping: dict[Any, str | int | float] = {
            "team": meta.team,
            "format": meta.format,
            "total": meta.total,
            "deadline": meta.deadline.timestamp(),
            "fingerprint": meta.fingerprint,
            "submission": meta.submission,
            "model": meta.model or "",
            "source": meta.source,
            "own_queue": int(meta.own_queue),
            "front_door": int(meta.front_door),
            "refused": meta.refused,
            "created": time.time(),
        }
        async with self._r.pipeline(transaction=True) as pipe:
            try:
                # The index too: renamed below, and a transaction's failing command does not
                # undo the others (a batch recorded without its lines).
                await self._call(pipe.watch(self._meta, self._index))
                recorded = await self._call(pipe.hget(self._meta, "submission"))
                if recorded is not None:
                    if text(recorded) != meta.submission:
                        raise BatchError(being_submitted(self.name))
                    await declare()
                    return meta.submission  # sent again: its answer lost with a connection
                if not await self._call(pipe.exists(self._index)):
                    raise BatchError(
                        f"batch create of {self.name!r} has no index of run {self._run!r} to "
                        "take its lines from: send its custom ids first (batch index, same run)"
                    )
                await declare()
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.hset(self._meta, mapping=mapping)
                pipe.rename(self._index, self._lines)
                pipe.zadd(self._batches, {self.name: time.time()})
                self._expire(pipe, self._meta, self._lines)
                await self._call(pipe.execute())
            except WatchError:
                raise BatchError(being_submitted(self.name)) from None  # recorded meanwhile
        return meta.submission

    async def reset_index(self) -> None:
        await self._call(self._r.delete(self._index))

    async def index(self, entries: Sequence[tuple[str, int]]) -> list[int]:
        """Add (custom_id, line) pairs; for each, the line that holds the custom_id first."""
        script = _scripts(self._r)[0]
        firsts: list[int] = []
        for start in range(0, len(entries), SCRIPT_SHARE):
            pairs = [value for entry in entries[start : start + SCRIPT_SHARE] for value in entry]
            found = await self._call(script(keys=[self._index], args=[3600, *pairs]))
            firsts += [int(n) for n in found]
        return firsts

    async def line_numbers(self, custom_ids: Sequence[str]) -> list[int | None]:
        if not custom_ids:
            return []
        raw = await self._call(self._r.hmget(self._lines, list(custom_ids)))
        return [None if v is None else int(v) for v in raw]

    async def published_among(self, custom_ids: Sequence[str]) -> list[bool]:
        return await self._among(self._published, custom_ids)

    async def written_among(self, custom_ids: Sequence[str]) -> list[bool]:
        return await self._among(self._written, custom_ids)

    async def outcomes_among(
        self, meta: BatchMeta, custom_ids: Sequence[str]
    ) -> list[Outcome | None]:
        """Per request, whether its job's outcome is stored, or its claim held: what a
        collect asks again for, or waits for, rather than writing it expired.

        Held: by a live owner (its lease running), or by a dead one that had a call in
        flight, which a worker's sweep bills and stores an outcome for (workers/claims.py).
        A claim left with neither (a poison job dead-lettered, an owner that died before
        any call of a job that then expired) brings no answer."""
        if not custom_ids:
            return []
        script = _scripts(self._r)[1]
        outcomes: list[Outcome | None] = []
        for start in range(0, len(custom_ids), SCRIPT_SHARE):
            keys = [
                key
                for custom_id in custom_ids[start : start + SCRIPT_SHARE]
                for job in (job_id(meta.jobs, custom_id),)
                for key in (self._keys.result(self.team, job), self._keys.claim(self.team, job))
            ]
            found = await self._call(script(keys=keys, args=[time.time() * 1000]))
            outcomes += [_OUTCOME[int(n)] for n in found]
        return outcomes

    async def mark_published(self, custom_ids: Sequence[str]) -> None:
        if not custom_ids:
            return
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.sadd(self._published, *custom_ids)
            self._expire(pipe, self._published)
            await self._call(pipe.execute())

    async def mark_written(self, entries: Sequence[tuple[str, Category, int]]) -> None:
        """Record (custom_id, category, nano-dollars) of lines now on disk, all new ones."""
        if not entries:
            return
        while not await self._call(self._mark_written(entries)):
            pass  # the written set changed meanwhile: look again

    async def _mark_written(self, entries: Sequence[tuple[str, Category, int]]) -> bool:
        """Count only the custom_ids not written yet, so a step sent again (its answer lost
        with a connection) counts nothing twice; False when another step raced this one."""
        async with self._r.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(self._written)
                known = await pipe.smismember(self._written, [c for c, _, _ in entries])
                fresh = [entry for entry, k in zip(entries, known, strict=True) if not k]
                if not fresh:
                    return True
                now = time.time()
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.sadd(self._written, *(custom_id for custom_id, _, _ in fresh))
                for category in CATEGORIES:
                    n = sum(1 for _, c, _ in fresh if c == category)
                    if n:
                        pipe.hincrby(self._meta, category, n)
                pipe.hincrby(self._meta, "spend_nano", sum(nano for _, _, nano in fresh))
                pipe.hsetnx(self._meta, "first_written", now)
                pipe.hset(self._meta, "last_written", now)
                self._expire(pipe, self._written)
                await pipe.execute()
            except WatchError:
                return False
        return True

    async def unwritten(self, cursor: int, chunk: int = 1000) -> tuple[int, list[tuple[str, bool]]]:
        """One page of (custom_id, published) of requests without a result line, and the
        cursor of the next page (0 after the last)."""
        cursor, found = await self._call(self._r.hscan(self._lines, cursor, count=chunk))
        ids = [text(k) for k in found]
        if not ids:
            return cursor, []
        written = await self.written_among(ids)
        published = await self.published_among(ids)
        return cursor, [(i, p) for i, w, p in zip(ids, written, published, strict=True) if not w]

    async def cancel(self) -> None:
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.set(self._canceled, 1)
            self._expire(pipe, self._canceled)
            await self._call(pipe.execute())

    async def is_canceled(self) -> bool:
        return bool(await self._call(self._r.exists(self._canceled)))

    async def counts(self, meta: BatchMeta) -> Counts:
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.hgetall(self._meta)
            pipe.scard(self._published)
            pipe.exists(self._canceled)
            raw, published, canceled = await self._call(pipe.execute())
        fields = {text(k): text(v) for k, v in raw.items()}

        def number(key: str) -> int:
            return int(fields.get(key, 0))

        def instant(key: str) -> float | None:
            return float(fields[key]) if key in fields else None

        return Counts(
            total=meta.total,
            published=int(published),
            done=number("done"),
            failed=number("failed"),
            expired=number("expired"),
            canceled=number("canceled"),
            spend_usd=number("spend_nano") / NANO,
            first_written=instant("first_written"),
            last_written=instant("last_written"),
            canceled_flag=bool(canceled),
        )

    async def hand_over(self) -> None:
        """The front door's runner gives the batch up to the team (``BatchMeta.front_door``
        cleared): the team's own collect deletes it when done, and ``batch delete`` may.
        HDEL, not HSET: a record gone meanwhile is not made again, without its fields."""
        await self._call(self._r.hdel(self._meta, "front_door"))

    async def delete(self) -> None:
        """Forget the batch: its record, progress and cancel flag."""
        keys = (self._meta, self._lines, self._index, self._published, self._written)
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.delete(*keys, self._canceled)
            pipe.zrem(self._batches, self.name)
            await self._call(pipe.execute())

    async def _among(self, key: str, custom_ids: Sequence[str]) -> list[bool]:
        if not custom_ids:
            return []
        return [bool(v) for v in await self._call(self._r.smismember(key, list(custom_ids)))]

    def _expire(self, pipe: Any, *keys: str) -> None:
        if self._expire_at is not None:
            for key in keys:
                pipe.expireat(key, self._expire_at)

    async def _call(self, awaitable: Any) -> Any:
        try:
            return await awaitable
        except WatchError:
            raise  # a race the caller settles, not a failure of Redis
        except (RedisError, OSError) as exc:
            raise ServiceUnavailable(
                f"Redis failed while reading or writing batch {self.name!r} "
                f"({type(exc).__name__}); check QUEUEGATE_REDIS_URL and re-run: "
                "the batch resumes where it stopped"
            ) from exc


def _scripts(client: aioredis.Redis) -> tuple[AsyncScript, AsyncScript]:
    """``client``'s index and outcomes scripts (``_SCRIPTS``)."""
    scripts = _SCRIPTS.get(client)
    if scripts is None:
        scripts = _SCRIPTS[client] = (
            client.register_script(lua_source("workers", "batch_index")),
            client.register_script(lua_source("workers", "batch_outcomes")),
        )
    return scripts


async def list_batches(
    client: aioredis.Redis, keys: Keys, team: str
) -> list[tuple[BatchMeta, Counts]]:
    """The team's batches still recorded, oldest first, each its record and its counts;
    those whose record expired are dropped from the list as they are found."""
    raw: list[Any] = await client.zrange(keys.batches(team), 0, -1)
    names = [text(n) for n in raw]
    batches: list[tuple[BatchMeta, Counts]] = []
    gone: list[str] = []
    for name in names:
        state = BatchState(client, keys, team, name)
        meta = await state.load()
        if meta is None:
            gone.append(name)
            continue
        batches.append((meta, await state.counts(meta)))
    if gone:
        await client.zrem(keys.batches(team), *gone)
    return batches
