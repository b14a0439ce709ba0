"""The front door while its Redis is frozen: connections hang, nothing is refused.

Redis is reached through a proxy that stops passing bytes (``TcpProxy.hang``), as a stopped
(SIGSTOP) Redis would; the worker keeps the shared Redis. A caller is answered within its
own timeout: ``service_unavailable`` (retry) only while nothing was published, else the
job's result or an answer naming it.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from frontdoor.chat_request import ANSWER_MARGIN
from frontdoor.routes.jobs import STORE_WAIT
from mockprovider import Behavior, MockConfig
from queuegate.settings import Settings
from tests.frontdoor_support import HELLO, open_door
from tests.proxy import TcpProxy
from tests.support import wait_until

TIMEOUT = 5.0
"""The caller's timeout (x-queuegate-timeout), seconds."""
MARGIN = 3.0
"""Seconds past it an answer may take on a loaded machine."""
LATE = 0.5
"""Seconds past a bound an answer counted from the request's arrival may leave: the
wrong-key count's own wait (up to 1 s while Redis hangs, the key not known yet) is inside
the bound, not after it."""


@pytest.mark.parametrize("idempotency_key", [None, "order-17"])
async def test_a_frozen_redis_before_the_publish_is_a_retry_within_the_timeout(
    settings: Settings, idempotency_key: str | None
) -> None:
    # Given a front door whose Redis is frozen
    async with TcpProxy(settings.redis_url) as proxy:
        frozen = settings.model_copy(update={"redis_url": proxy.url})
        async with (
            open_door(settings, door_settings=frozen) as door,
            door.client(timeout=TIMEOUT + 10) as client,
        ):
            proxy.hang()
            try:
                # When a request with a 5 s timeout arrives
                headers = {"x-queuegate-timeout": f"{TIMEOUT:g}"}
                if idempotency_key is not None:
                    headers["idempotency-key"] = idempotency_key
                started = time.monotonic()
                with pytest.raises(openai.APIStatusError) as refused:
                    await client.chat.completions.create(
                        model="gpt-4o-mini", messages=HELLO, extra_headers=headers
                    )
                took = time.monotonic() - started
            finally:
                await proxy.up()

            # Expect a retry answered when its timeout passes, not a second later
            assert refused.value.status_code == 503
            assert "nothing was published" in refused.value.message
            assert TIMEOUT - ANSWER_MARGIN <= took < TIMEOUT + LATE

            # and nothing published: once Redis is back, a new request is the first call
            answer = await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
            assert answer.choices[0].message.content
            assert door.gateway.mock.stats.calls == 1


async def test_a_frozen_redis_after_the_publish_does_not_hold_the_answer(
    settings: Settings,
) -> None:
    # Given a front door whose Redis freezes once its job reached the provider
    slow = MockConfig(default=Behavior(latency_ms=1000))
    async with TcpProxy(settings.redis_url) as proxy:
        frozen = settings.model_copy(update={"redis_url": proxy.url})
        async with (
            open_door(settings, mock_config=slow, door_settings=frozen) as door,
            door.client(timeout=TIMEOUT + 10) as client,
            httpx.AsyncClient(base_url=door.url, timeout=STORE_WAIT + 10) as http,
        ):
            mock = door.gateway.mock
            try:
                # When a request with a 5 s timeout is published, then Redis freezes
                started = time.monotonic()
                answering = asyncio.ensure_future(
                    client.chat.completions.with_raw_response.create(
                        model="gpt-4o-mini",
                        messages=HELLO,
                        extra_headers={"x-queuegate-timeout": f"{TIMEOUT:g}"},
                    )
                )
                await wait_until(lambda: mock.stats.calls == 1)
                proxy.hang()
                raw = await answering
                took = time.monotonic() - started

                # and the caller reads the job back by id while Redis is still frozen
                job_id = raw.headers["x-queuegate-job-id"]
                started = time.monotonic()
                auth = {"authorization": f"Bearer {door.keys['alpha']}"}
                read = await http.get(f"/v1/jobs/{job_id}", headers=auth)
                read_took = time.monotonic() - started
            finally:
                await proxy.up()

            # Expect the job's answer, naming it, within the timeout; the provider called once
            assert raw.status_code == 200
            assert raw.parse().choices[0].message.content
            assert took < TIMEOUT + MARGIN
            assert mock.stats.calls == 1

            # and the read by id answered within its bound: ask again, no resubmission
            assert read.status_code == 503
            assert job_id in read.json()["error"]["message"]
            assert read_took < STORE_WAIT + MARGIN
            again = await http.get(f"/v1/jobs/{job_id}", headers=auth)
            assert again.status_code == 200


async def test_a_long_poll_while_redis_is_frozen_ends_within_its_wait_and_the_store_bound(
    settings: Settings,
) -> None:
    wait = 1.0
    # Given a front door whose Redis is frozen before its first request
    async with TcpProxy(settings.redis_url) as proxy:
        frozen = settings.model_copy(update={"redis_url": proxy.url})
        async with (
            open_door(settings, door_settings=frozen) as door,
            httpx.AsyncClient(base_url=door.url, timeout=wait + STORE_WAIT + 10) as http,
        ):
            proxy.hang()
            try:
                # When a caller long-polls a job for 1 s
                started = time.monotonic()
                read = await http.get(
                    "/v1/jobs/job-of-a-frozen-store",
                    params={"wait": wait},
                    headers={"authorization": f"Bearer {door.keys['alpha']}"},
                )
                took = time.monotonic() - started
            finally:
                await proxy.up()

    # Expect it told to ask again at N + STORE_WAIT seconds from its arrival, as documented
    assert read.status_code == 503, read.text
    assert wait + STORE_WAIT <= took < wait + STORE_WAIT + LATE
