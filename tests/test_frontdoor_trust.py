"""Whom the front door counts wrong keys against, and whom that count may refuse: the address
a connection comes from (a proxy's forwarded one only when the proxy is named trusted), and
never a key found live, so that one attacker behind a shared address locks no team out."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import AsyncIterator

import openai
import pytest
import redis.asyncio as aioredis
from pydantic import ValidationError
from starlette.requests import Request

from frontdoor.failed_keys import client_of
from frontdoor.serve import serving
from queuegate.keys import Keys
from queuegate.settings import Settings, settings_problem, trusted_proxies
from queuegate.tenancy import hash_api_key
from router import load_catalog
from tests.frontdoor_support import HELLO, Door, open_door

WRONG = "qg_000000000000_" + "x" * 43
"""Shaped like a key, live for no one: looked up, and counted when not found."""


@contextlib.asynccontextmanager
async def another_process(door: Door, settings: Settings) -> AsyncIterator[str]:
    """A second front door before the same gateway, as ``--processes 2`` runs: its own copy
    of the keys, the wrong-key count shared in Redis. Yields its ``/v1`` URL."""
    catalog = load_catalog(None, {"QUEUEGATE_MOCK_URL": door.gateway.mock.url})
    async with serving(settings, catalog) as url:
        yield f"{url}/v1"


async def until_held(redis_client: aioredis.Redis, name: str) -> None:
    """Wait for Redis to hold ``name``: the front door writes it in the background, and no
    event announces it."""
    for _ in range(1000):
        if await redis_client.exists(name):
            return
        await asyncio.sleep(0.01)
    raise TimeoutError(f"Redis holds no {name} after 10 s")


def api(base_url: str, key: str, **headers: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=base_url, api_key=key, default_headers=headers, max_retries=0
    )


async def wrong_keys(base_url: str, times: int, **headers: str) -> None:
    async with api(base_url, WRONG, **headers) as client:
        for _ in range(times):
            with pytest.raises(openai.AuthenticationError):
                await client.models.list()


async def test_x_forwarded_for_counts_only_from_a_proxy_named_trusted(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given at most 2 wrong keys a minute per address, and no proxy named trusted
    settings = settings.model_copy(update={"failed_key_limit": 2, "failed_key_window": 60.0})
    counted = Keys(settings.redis_prefix)
    async with open_door(settings) as door:
        # When a client at loopback presents wrong keys naming another address
        await wrong_keys(door.v1, 2, **{"X-Forwarded-For": "203.0.113.50"})

        # Expect them counted against loopback, where it connects from, none against the
        # address it named (which it could otherwise have locked out)
        assert await redis_client.get(counted.failed_keys("203.0.113.50")) is None
        assert int(await redis_client.get(counted.failed_keys("127.0.0.1"))) == 2
        # ... and naming yet another address does not get it past its lockout
        async with api(door.v1, WRONG, **{"X-Forwarded-For": "198.51.100.9"}) as client:
            with pytest.raises(openai.RateLimitError) as refused:
                await client.models.list()
        assert refused.value.code == "too_many_requests"

        # When a proxy at loopback is named trusted (a second process of the same door)
        trusting = settings.model_copy(update={"http_trusted_proxies": "127.0.0.0/8"})
        async with another_process(door, trusting) as proxied:
            # ... and it forwards a client that named an address of its own before the
            # one the proxy appended
            forwarded = {"X-Forwarded-For": "198.51.100.10, 203.0.113.51"}
            await wrong_keys(proxied, 1, **forwarded)

    # Expect the wrong key counted against the address the proxy saw, not the one the
    # client named, nor the proxy's
    assert int(await redis_client.get(counted.failed_keys("203.0.113.51"))) == 1
    assert await redis_client.get(counted.failed_keys("198.51.100.10")) is None
    assert int(await redis_client.get(counted.failed_keys("127.0.0.1"))) == 2


async def test_wrong_keys_sent_together_are_looked_up_no_more_than_the_limit(
    settings: Settings,
) -> None:
    # Given at most 3 wrong keys a minute per address
    settings = settings.model_copy(update={"failed_key_limit": 3, "failed_key_window": 60.0})
    async with open_door(settings) as door:
        # When 12 wrong keys arrive from it at once, each on a connection of its own (each
        # was looked up: the count was read before any of them was added to it)
        async def guess(n: int) -> type[openai.APIStatusError]:
            async with api(door.v1, f"qg_{n:012d}_" + "x" * 43) as client:
                try:
                    await client.models.list()
                except openai.APIStatusError as exc:
                    return type(exc)
            raise AssertionError("a wrong key was served")

        answers = await asyncio.gather(*(guess(n) for n in range(12)))

    # Expect 3 looked up and refused 401, the others 429 unlooked-up
    assert (
        sorted(a.__name__ for a in answers) == ["AuthenticationError"] * 3 + ["RateLimitError"] * 9
    )


def test_a_proxy_named_by_its_ipv4_address_is_trusted_on_a_listener_on_ipv6_too() -> None:
    # Given a proxy named by IPv4, as uvicorn gets the list
    networks = [ipaddress.ip_network(n) for n in trusted_proxies("127.0.0.0/24")]
    # Expect its connections to a listener on `::` (IPv4-mapped peers) trusted as well
    # (they were not: its header was ignored, and every client behind it shared one count)
    peer = ipaddress.ip_address("::ffff:127.0.0.60")
    assert any(peer in network for network in networks)
    assert not any(ipaddress.ip_address("::ffff:127.0.1.60") in n for n in networks)


@pytest.mark.parametrize(
    ("peer", "counted"),
    [
        ("::ffff:198.51.100.7", "198.51.100.7"),
        ("2001:db8:0:0:1::99", "2001:db8::/64"),
        ("2001:DB8::7", "2001:db8::/64"),
        ("198.51.100.7", "198.51.100.7"),
    ],
)
def test_wrong_keys_count_against_an_address_however_written_and_ipv6_by_its_64(
    peer: str, counted: str
) -> None:
    # (an IPv6 host holds its /64 whole: counted per address, it had that many tries)
    request = Request({"type": "http", "client": (peer, 5000), "headers": []})
    assert client_of(request) == counted


def test_trusted_proxies_that_are_no_addresses_are_refused_in_one_line() -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(http_trusted_proxies="10.0.0.5, proxy.internal")
    problem = settings_problem(refused.value)
    assert problem.startswith("QUEUEGATE_HTTP_TRUSTED_PROXIES: 'proxy.internal' is no IP")
    assert "\n" not in problem
    # ... and those that are, written as uvicorn matches them (a network with host bits
    # would be a name no address matches there)
    listed = Settings(http_trusted_proxies=" 10.0.0.5, 10.1.2.3/16,::1 ").http_trusted_proxies
    assert trusted_proxies(listed) == [
        "10.0.0.5/32", "::ffff:a00:5/128", "10.1.0.0/16", "::ffff:a01:0/112", "::1/128"
    ]  # fmt: skip


async def test_an_address_locked_out_for_wrong_keys_still_has_its_teams_keys_served(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given at most 3 wrong keys a minute per address, and team alpha served at one
    # front-door process
    settings = settings.model_copy(update={"failed_key_limit": 3, "failed_key_window": 60.0})
    proven = Keys(settings.redis_prefix).proven_key
    async with open_door(settings) as door, another_process(door, settings) as second:
        async with door.client("alpha") as alpha:
            assert (await alpha.models.list()).data

        await until_held(redis_client, proven(hash_api_key(door.keys["alpha"])))

        # When an attacker at the same address (behind the same NAT) locks it out at the
        # other process, which has not seen alpha's key yet
        await wrong_keys(second, 3)
        async with api(second, WRONG) as attacker:
            with pytest.raises(openai.RateLimitError):
                await attacker.models.list()

        # Expect alpha's key served there all the same, by the official SDK without retries
        async with api(second, door.keys["alpha"]) as alpha:
            assert (await alpha.models.list()).data
            answered = await alpha.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
            assert answered.choices[0].message.content
        # ... while guesses from that address are still refused without a lookup
        async with api(second, "qg_111111111111_" + "y" * 43) as guess:
            with pytest.raises(openai.RateLimitError) as refused:
                await guess.models.list()
        assert 0 < int(refused.value.response.headers["retry-after"]) <= 60
