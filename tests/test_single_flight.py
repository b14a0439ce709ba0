"""One call per key at a time, its answer or its exception shared by every caller meanwhile."""

from __future__ import annotations

import asyncio
import gc

import pytest

from queuegate.single_flight import SingleFlight


class Calls:
    """A call that waits for ``release`` and counts how often it was made."""

    def __init__(self) -> None:
        self.made = 0
        self.release = asyncio.Event()

    async def answer(self) -> int:
        self.made += 1
        await self.release.wait()
        return self.made


async def test_callers_asking_meanwhile_share_one_call_and_a_later_one_calls_again() -> None:
    flight: SingleFlight[str, int] = SingleFlight()
    calls = Calls()
    waiting = [asyncio.create_task(flight("q", calls.answer)) for _ in range(50)]
    other = asyncio.create_task(flight("other", calls.answer))
    await asyncio.sleep(0)
    calls.release.set()
    assert await asyncio.gather(*waiting) == [waiting[0].result()] * 50
    await other
    assert calls.made == 2  # one for "q", one for "other"
    assert await flight("q", calls.answer) == 3  # the first call ended: asked anew


async def test_a_caller_cancelled_does_not_cancel_the_others_answer() -> None:
    flight: SingleFlight[str, int] = SingleFlight()
    calls = Calls()
    first = asyncio.create_task(flight("q", calls.answer))
    second = asyncio.create_task(flight("q", calls.answer))
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.sleep(0)
    calls.release.set()
    assert await second == 1
    assert first.cancelled()


async def test_an_exception_reaches_every_caller_and_none_is_left_unretrieved() -> None:
    flight: SingleFlight[str, int] = SingleFlight()
    release = asyncio.Event()

    async def failing() -> int:
        await release.wait()
        raise ConnectionError("refused")

    waiting = [asyncio.create_task(flight("q", failing)) for _ in range(3)]
    await asyncio.sleep(0)
    release.set()
    for outcome in await asyncio.gather(*waiting, return_exceptions=True):
        assert isinstance(outcome, ConnectionError)

    # Every caller cancelled before the call fails: nobody raises it, and asyncio must not
    # report it as an exception never retrieved.
    reported: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: reported.append(context))
    release.clear()
    alone = asyncio.create_task(flight("q", failing))
    await asyncio.sleep(0)
    alone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await alone
    release.set()
    for _ in range(3):
        await asyncio.sleep(0)
    gc.collect()
    assert reported == []
