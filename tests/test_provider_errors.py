"""How a job that no provider served ends: the right error class, the calls really made, the
provider's retry hint, no key in any text a provider sent back, and no crash on a catalog value
the HTTP client refuses. Over real HTTP against the mock."""

from __future__ import annotations

import base64
import re
import time
import traceback
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from admin.teams import add, set_security
from mockprovider import Behavior, MockConfig, MockProvider
from mockprovider.catalog import mock_deployment
from producer import GatewayClient
from queuegate.errors import (
    AllProvidersFailed,
    ConfigError,
    ContextLengthExceeded,
    InvalidRequest,
    JobError,
    RateLimited,
)
from queuegate.management import BrokerAdmin
from queuegate.messages import HTTP_STATUS, ChatJob
from queuegate.settings import Settings
from router import Catalog, load_catalog, open_router
from router.providers import ADAPTERS
from router.providers.base import scrub
from tests.support import running_gateway
from tests.test_tenancy import as_team, not_operator

KEY = "sk-SENTINEL-provider-errors-0123456789"
ENV = {"QUEUEGATE_MOCK_KEY": KEY}
CONTEXT_TOO_LONG = {
    "type": "error",
    "error": {"type": "invalid_request_error", "message": "prompt is too long: 210000 tokens"},
}


def chat(model: str, **fields: Any) -> ChatJob:
    return ChatJob.model_validate(
        {
            "job_id": f"job-{time.monotonic_ns()}",
            "team": "alpha",
            "model": model,
            "messages": [{"role": "user", "content": "Hello there"}],
            **fields,
        }
    )


def everything_said(exc: BaseException) -> str:
    said = "".join(traceback.format_exception(exc))
    if isinstance(exc, JobError):
        said += repr(exc.attempts)
    return said


def two_providers(url: str, **entries: Any) -> Catalog:
    """``claude`` (Anthropic) falling back to ``gpt`` (OpenAI) unless ``entries`` say."""
    models: dict[str, Any] = {
        "claude": {
            "deployments": [
                mock_deployment("claude-dep", "claude-model", url, provider="anthropic")
            ]
        },
        "gpt": {"deployments": [mock_deployment("gpt-dep", "gpt-model", url)]},
    }
    for alias, fields in entries.items():
        models[alias] = models[alias] | fields
    return Catalog.model_validate({"models": models})


@pytest.fixture
async def mock() -> AsyncIterator[MockProvider]:
    async with MockProvider() as provider:
        yield provider


# --- 3: what no deployment can serve is the caller's error -------------------------------------


@pytest.mark.parametrize(
    ("fields", "what"),
    [
        ({"params": {"response_format": {"type": "json_object"}}}, "json_object (JSON mode)"),
        ({"params": {"n": 2}}, "n = 2: more than one choice"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "input_audio",
                                "input_audio": {"data": "UklG", "format": "wav"},
                            }
                        ],
                    }
                ]
            },
            "input_audio",
        ),
    ],
)
async def test_a_request_no_deployment_can_serve_is_invalid_and_makes_no_call(
    settings: Settings, mock: MockProvider, fields: dict[str, Any], what: str
) -> None:
    async with open_router(two_providers(mock.url), ENV, settings) as router:
        with pytest.raises(InvalidRequest) as caught:
            await router.complete(chat("claude", **fields))

    assert caught.value.code == "invalid_request"
    assert "no deployment along the chain can serve this request" in caught.value.message
    assert what in caught.value.message
    assert caught.value.attempts == []
    assert mock.stats.calls == 0


async def test_a_deployment_that_cannot_serve_is_not_counted_beside_one_that_failed(
    settings: Settings,
) -> None:
    faults = MockConfig(models={"gpt-model": Behavior(error_rate=1.0, error_status=500)})
    async with MockProvider(faults) as mock:
        catalog = two_providers(mock.url, claude={"fallbacks": ["gpt"]})
        async with open_router(catalog, ENV, settings) as router:
            with pytest.raises(AllProvidersFailed) as caught:
                await router.complete(chat("claude", params={"n": 2}))

    assert "after 2 calls" in caught.value.message  # gpt, retried once; claude made none
    assert {attempt.deployment for attempt in caught.value.attempts} == {"gpt-dep"}


async def test_a_prompt_too_long_for_every_model_is_context_length_exceeded(
    settings: Settings,
) -> None:
    # Given claude whose context fallback gpt is too short as well
    too_long = Behavior(error_rate=1.0, error_status=400, error_body=CONTEXT_TOO_LONG)
    faults = MockConfig(models={"claude-model": too_long, "gpt-model": too_long})
    async with MockProvider(faults) as mock:
        catalog = two_providers(mock.url, claude={"context_fallbacks": ["gpt"]})
        async with open_router(catalog, ENV, settings) as router:
            with pytest.raises(ContextLengthExceeded) as caught:
                await router.complete(chat("claude"))

    assert caught.value.code == "context_length_exceeded"
    assert HTTP_STATUS["context_length_exceeded"] == 400
    assert [a.deployment for a in caught.value.attempts] == ["claude-dep", "gpt-dep"]


# --- 4: a provider's 429 hands on its Retry-After -----------------------------------------------


async def test_rate_limited_carries_the_providers_retry_after(settings: Settings) -> None:
    # Given a deployment that answers 429 asking for 30 s, more than a job's budget of waiting
    faults = MockConfig(
        models={"gpt-model": Behavior(error_rate=1.0, error_status=429, retry_after=30)}
    )
    async with MockProvider(faults) as mock:
        catalog = two_providers(mock.url)
        async with open_router(catalog, ENV, settings) as router:
            with pytest.raises(RateLimited) as caught:
                await router.complete(chat("gpt"))

    retry_after_ms = caught.value.retry_after_ms
    # Expect the wait it asked for, less the moments since (not null, not the default pause)
    assert retry_after_ms is not None and 25_000 < retry_after_ms <= 30_000
    assert mock.stats.calls == 1


# --- 21.6: no key in what a provider sends back, on any path ------------------------------------


def split(key: str) -> str:
    """The key as a provider might echo it, broken across a line."""
    return key[:12] + "\n" + key[12:]


def test_scrub_collapses_whitespace_before_it_redacts() -> None:
    said = scrub(f"Incorrect API key:\n  {split(KEY)}\r\n please check", KEY)

    assert said == "Incorrect API key: [redacted] please check"


def b64(data: str, offset: int) -> str:
    """``data`` base64-encoded inside a longer text, ``offset`` bytes after its start."""
    return base64.b64encode(b"x" * offset + data.encode()).decode()


KEY_FORMS = {
    "base64 aligned": b64(KEY, 0),
    "base64 one byte in": b64(KEY, 1),
    "base64 two bytes in": b64(KEY, 2),
    "url-safe base64": base64.urlsafe_b64encode(b"~" + KEY.encode()).decode(),
    "percent-encoded": "".join(f"%{ord(char):02X}" for char in KEY),
    "partly percent-encoded": quote(KEY, safe="").replace("-", "%2d"),
    "zero-width spaces": "\u200b".join(KEY),
    "other format characters": "\u2060".join(KEY[:20]) + "\u00ad" + "\ufeff".join(KEY[20:]),
    "upper case": KEY.upper(),
    "hex": KEY.encode().hex(),
    "upper-case hex": KEY.encode().hex().upper(),
    "hex html references": "".join(f"&#x{ord(char):x};" for char in KEY),
    "decimal html references": "".join(f"&#{ord(char)};" for char in KEY),
    "an html reference without its ;": KEY.replace("S", "&#83").replace("-", "&#x2d;"),
    "dots between characters": ".".join(KEY),
    "a separator of the key's own between characters": "-".join(KEY),
    "mixed separators": "".join(char + ",_/"[number % 3] for number, char in enumerate(KEY)),
    "spaced separators": " . ".join(KEY),
    "prefix of 12": KEY[:12],
    "suffix of 12": KEY[-12:],
    "middle piece": KEY[8:24],
}


@pytest.mark.parametrize("form", KEY_FORMS.values(), ids=KEY_FORMS.keys())
def test_scrub_redacts_every_encoding_and_piece_of_the_key(form: str) -> None:
    said = scrub(f"rejected key={form} for this account", KEY)

    # Only the few base64 characters that also encode the bytes around the key may remain
    assert re.fullmatch(r"rejected key=\S{0,4}\[redacted\]\S{0,4} for this account", said), said


def test_scrub_reads_named_html_references() -> None:
    key = "sk_live.0123456789abcdef"
    said = scrub(f"bad key {key.replace('_', '&lowbar;').replace('.', '&period;')}!", key)

    assert said == "bad key [redacted]!"


def test_scrub_keeps_text_that_only_looks_like_escapes() -> None:
    said = scrub("a &b; &#xZZ; &amp 100% &#1114112; - s.k. and 6b6579 stay", KEY)

    assert said == "a &b; &#xZZ; &amp 100% &#1114112; - s.k. and 6b6579 stay"


def test_scrub_keeps_its_place_past_characters_that_lower_to_two() -> None:
    said = scrub(f"İİİ key {KEY.upper()} İ%41 rest", KEY)

    assert said == "İİİ key [redacted] İ%41 rest"


def test_scrub_redacts_more_than_half_of_a_short_key() -> None:
    assert scrub("bad key sk-test-m", "sk-test-mock") == "bad key [redacted]"
    assert scrub("sk- and test are fine", "sk-test-mock") == "sk- and test are fine"


def test_scrub_leaves_an_error_whole_for_a_placeholder_key_of_a_few_characters() -> None:
    said = "Invalid 'max_tokens': expected an integer; got 'x' (see the docs)"
    # A key "x" masked every x and every e (its base64 begins "eA"): "inj[redacted]ct[redacted]d"
    for key in ("x", "sk", "abc"):
        assert scrub(said, key) == said
    # ... nor its hex or base64 ("abc" is 616263, YWJj)
    assert scrub("ids 6162 and 6263, YWJj", "abc") == "ids 6162 and 6263, YWJj"
    assert scrub("a key abcd was sent", "abcd") == "a key [redacted] was sent"


def test_scrub_is_fast_on_a_large_error_body() -> None:
    body = "upstream said: " + " ".join(f"word{i}%20x" for i in range(20_000)) + KEY.upper()
    echoes = "echoed: " + KEY * 2_000
    started = time.monotonic()
    said = scrub(body, KEY), scrub(echoes, KEY)
    # Generous under load; the quadratic versions this guards against take many seconds
    assert time.monotonic() - started < 5
    assert said[0].startswith("upstream said: word0%20x")
    assert said[1] == "echoed: [redacted]"


ECHO_KEY = "sk-test-mock"  # the key running_gateway gives the worker
ECHOES = {
    # Each list fits the 160 characters kept, after the deployment's name and the status
    "encoded": [
        *(b64(ECHO_KEY, offset) for offset in range(3)),
        quote(ECHO_KEY, safe="-").replace("-", "%2D"),
        "\u200b".join(ECHO_KEY),
        ECHO_KEY.upper(),
        ECHO_KEY[:9],
    ],
    "spelt out": [
        ECHO_KEY.encode().hex(),
        ECHO_KEY.encode().hex().upper(),
        ".".join(ECHO_KEY),
        "".join(f"&#x{ord(char):x};" for char in ECHO_KEY),
        "".join(f"&#{ord(char)}" for char in ECHO_KEY),
    ],
}


@pytest.mark.parametrize("forms", ECHOES.values(), ids=ECHOES.keys())
async def test_every_form_of_an_echoed_key_is_scrubbed_from_the_stored_result(
    settings: Settings, forms: list[str]
) -> None:
    echo = " | ".join(forms)
    body = {"error": {"type": "invalid_request_error", "message": echo}}
    faults = MockConfig(
        models={"gpt-4o-mini": Behavior(error_rate=1.0, error_status=400, error_body=body)}
    )
    async with running_gateway(settings, mock_config=faults) as gw, gw.client("alpha") as client:
        handle = await client.submit(client.job("gpt-4o-mini", [{"role": "user", "content": "Hi"}]))
        result = await handle.result(10)

        assert result.status == "error" and result.error is not None
        assert result.error.message.count("[redacted]") == len(forms)
        [row] = await gw.usage_rows(1)
    stored = result.model_dump_json() + str(dict(row))
    for form in forms:
        assert form not in stored
    assert "sk-test" not in stored.lower()


@pytest.mark.parametrize("stream", [False, True], ids=["http error body", "stream error event"])
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_a_key_echoed_by_the_provider_is_scrubbed_on_every_path(
    settings: Settings, stream: bool, provider: str
) -> None:
    # Given a provider that echoes the key, once whole and once split across a line break
    echo = f"invalid key {KEY} (or {split(KEY)})"
    if stream:
        error = {"type": "invalid_request_error", "message": echo}
        behavior = Behavior(stream_error=error, stream_cut_after=0)
    else:
        body = {"error": {"type": "invalid_request_error", "message": echo}}
        behavior = Behavior(error_rate=1.0, error_status=400, error_body=body)
    async with MockProvider(MockConfig(default=behavior)) as mock:
        catalog = Catalog.model_validate(
            {
                "models": {
                    "m": {"deployments": [mock_deployment("d", "m", mock.url, provider=provider)]}
                }
            }
        )
        async with open_router(catalog, ENV, settings) as router:
            with pytest.raises(JobError) as caught:
                await router.complete(chat("m", stream=stream), on_delta=_ignore)

    assert caught.value.code == "invalid_request"
    said = everything_said(caught.value)
    assert "invalid key [redacted] (or [redacted])" in caught.value.message
    for piece in (KEY, KEY[:12], KEY[12:]):
        assert piece not in said


async def _ignore(delta: Any, model: str, alias: str) -> None:
    pass


async def test_a_key_echoed_in_a_stream_error_never_reaches_the_stored_result(
    settings: Settings, tmp_path: Path
) -> None:
    echo = {"type": "invalid_request_error", "message": f"key {split('sk-test-mock')} refused"}
    faults = MockConfig(models={"gpt-4o-mini": Behavior(stream_error=echo, stream_cut_after=0)})
    async with running_gateway(settings, mock_config=faults) as gw, gw.client("alpha") as client:
        handle = await client.submit(
            client.job("gpt-4o-mini", [{"role": "user", "content": "Hi"}], stream=True)
        )
        result = await handle.result(10)

        assert result.status == "error" and result.error is not None
        assert "[redacted]" in result.error.message
        stored = result.model_dump_json()
        assert "sk-test-mock" not in stored and "sk-test-m" not in stored
        [row] = await gw.usage_rows(1)
        assert "sk-test-m" not in str(dict(row))


# --- 21.7: no catalog value makes a job crash-loop ----------------------------------------------


def test_a_catalog_with_credentials_in_an_api_base_is_refused_at_load(tmp_path: Path) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_text(
        "models:\n  m:\n    deployments:\n"
        "      - {name: d, provider: openai, model: m, api_key_env: K,\n"
        "         api_base: 'https://user:hunter2@api.example.com',\n"
        "         input_per_mtok: 1, output_per_mtok: 1}\n"
    )

    with pytest.raises(ConfigError) as caught:
        load_catalog(path, {})

    message = str(caught.value)
    assert "models.m.deployments.0: api_base: credentials in the URL are not allowed" in message
    assert "\n" not in message
    assert "hunter2" not in message


@pytest.mark.parametrize(
    "api_base",
    [
        "https://api.example.com/v1;key=hunter2",
        "https://api.example.com;key=hunter2/v1",
        "https://api.example.com/path@hunter2",
        "https://api.example.com/v1/@hunter2/x",
    ],
)
def test_an_api_base_with_a_path_parameter_or_an_at_sign_is_refused_at_load(
    tmp_path: Path, api_base: str
) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_text(
        "models:\n  m:\n    deployments:\n"
        "      - {name: d, provider: openai, model: m, api_key_env: K,\n"
        f"         api_base: '{api_base}', input_per_mtok: 1, output_per_mtok: 1}}\n"
    )

    with pytest.raises(ConfigError) as caught:
        load_catalog(path, {})

    message = str(caught.value)
    assert "models.m.deployments.0: api_base: ';' and '@' are not allowed" in message
    assert "\n" not in message
    assert "hunter2" not in message


@pytest.mark.parametrize(
    "api_base", ["http://[::1", "http://127.0.0.1:99999", "http://host/?q=1", "http://host/#f"]
)
def test_an_api_base_the_http_client_cannot_use_is_refused_at_load(api_base: str) -> None:
    deployment = mock_deployment("d", "m", api_base)
    with pytest.raises(ValueError, match="api_base"):
        Catalog.model_validate({"models": {"m": {"deployments": [deployment]}}})


async def test_a_key_the_http_client_refuses_fails_the_job_cleanly(
    settings: Settings, mock: MockProvider
) -> None:
    # Given a key that no HTTP client will put in a header (a line break inside it)
    broken = "sk-SENTINEL-broken\nkey-0123456789"
    async with open_router(
        two_providers(mock.url), {"QUEUEGATE_MOCK_KEY": broken}, settings
    ) as router:
        with pytest.raises(AllProvidersFailed) as caught:
            await router.complete(chat("gpt"))

    assert "misconfigured" in caught.value.message
    assert caught.value.attempts == []  # it never reached the network
    said = everything_said(caught.value)
    assert "SENTINEL" not in said and "0123456789" not in said
    assert mock.stats.calls == 0


async def test_a_worker_answers_a_job_whose_key_the_http_client_refuses(
    settings: Settings, tmp_path: Path
) -> None:
    # Given a deployment whose mounted key file holds a key with a line break inside
    key_file = tmp_path / "key"
    key_file.write_text("sk-SENTINEL-file\nkey-0123456789\n")
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(
        "models:\n  broken:\n    deployments:\n"
        "      - {name: d, provider: openai, model: m, api_base: '${QUEUEGATE_MOCK_URL}',\n"
        f"         api_key_file: '{key_file}', input_per_mtok: 1, output_per_mtok: 1}}\n"
    )
    async with running_gateway(settings, catalog=catalog) as gw, gw.client("alpha") as client:
        # When a job goes to it
        result = await client.chat("broken", [{"role": "user", "content": "Hi"}], timeout=10)

        # Expect an answer (not a job crashing back to its queue), accounted once
        assert result.status == "error" and result.error is not None
        assert result.error.code == "all_providers_failed"
        assert "SENTINEL" not in result.model_dump_json()
        [row] = await gw.usage_rows(1)
        assert row["job_id"] == result.job_id
        assert gw.mock.stats.calls == 0


@pytest.mark.parametrize("identity", ["broker", "api_key"])
async def test_a_fault_reading_an_answer_is_its_calls_bad_response_billed_never_requeued(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, identity: str
) -> None:
    # Given a worker that fails reading every answer in a way no redelivery cures (what a
    # value no check caught does: float infinity turned into milliseconds), and a team added
    # the default way (its own broker user) or proving itself with an API key
    def overflow(body: Any, model: str) -> Any:
        raise OverflowError("cannot convert float infinity to integer")

    for adapter in ADAPTERS.values():
        monkeypatch.setattr(adapter, "parse_response", overflow)
    settings = not_operator(settings)
    credentials = await add(settings, "alpha")
    app, api_key = as_team(settings, credentials), None
    if identity == "api_key":
        _, keyed = await set_security(settings, "alpha", identity="api_key")
        assert keyed is not None
        app, api_key = settings, keyed.api_key
    try:
        async with (
            running_gateway(settings) as gw,
            GatewayClient(app, team="alpha", api_key=api_key) as client,
        ):
            # When a job meets it
            result = await client.chat(
                "gpt-4o-mini", [{"role": "user", "content": "Hi"}], timeout=10
            )

            # Expect an error result (the job does not come back until the delivery limit,
            # unanswered), accounted once, each call the provider answered recorded as its
            # bad response with its 200 and billed (the provider charged it)
            assert result.status == "error" and result.error is not None
            [row] = await gw.usage_rows(1)
            assert row["job_id"] == result.job_id and row["error_code"] == result.error.code
            assert row["identity"].startswith(f"{identity}:")
            attempts = [(a["status"], a["error"]) for a in row["attempt_log"]]
            assert attempts == [(200, "bad_response")] * gw.mock.stats.calls
            assert gw.mock.stats.calls >= 1 and row["cost_usd"] > 0
    finally:
        if credentials.user:
            async with BrokerAdmin.of(settings) as admin:
                await admin.delete_user(credentials.user)
