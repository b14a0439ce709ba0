"""Matching replies to jobs: one future per job id, duplicates dropped, no polling."""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from queuegate.messages import ChatResult

SEEN_LIMIT = 100_000
"""Answered job ids remembered to drop redelivered duplicates; older ones are forgotten."""


class ReplyBook:
    """A future per job id, created when the job is published or its result arrives first.

    The future stays until someone takes its result, so a result that lands before
    ``wait`` is called is not lost.
    """

    def __init__(self) -> None:
        self._futures: dict[str, asyncio.Future[ChatResult]] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()
        self.duplicates = 0

    def expect(self, job_id: str) -> asyncio.Future[ChatResult]:
        future = self._futures.get(job_id)
        if future is None:
            future = self._futures[job_id] = asyncio.get_running_loop().create_future()
        return future

    def deliver(self, result: ChatResult) -> bool:
        """Record a result; False when it duplicates one already delivered."""
        if result.job_id in self._seen:
            self.duplicates += 1
            return False
        self._seen[result.job_id] = None
        if len(self._seen) > SEEN_LIMIT:
            self._seen.popitem(last=False)
        future = self.expect(result.job_id)
        if not future.done():
            future.set_result(result)
        return True

    async def wait(self, job_id: str, timeout: float | None) -> ChatResult:
        """The job's result; on TimeoutError the job stays expected, for a later wait."""
        future = self.expect(job_id)
        # asyncio.wait leaves the future be on a timeout or a cancel, in one hop fewer
        # than wait_for around a shield.
        await asyncio.wait((future,), timeout=timeout)
        if not future.done():
            raise TimeoutError
        self._futures.pop(job_id, None)
        return future.result()

    def forget(self, job_id: str) -> None:
        future = self._futures.pop(job_id, None)
        if future is not None:
            future.cancel()
