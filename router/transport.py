"""The HTTP boundary: one POST to a provider; every failure leaves here as a ProviderError.

httpx exceptions are mapped with messages written here, never their own text, and the
upstream error message kept as detail is scrubbed of the key and cut to one short line.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from email.utils import parsedate_to_datetime
from time import time
from typing import Any

import httpx
import orjson

from router.providers.base import ProviderError, UpstreamRequest, classify

MAX_DETAIL = 160
"""Characters of an upstream error message kept: enough to say what was wrong, no more."""

_JSON = {"content-type": "application/json"}


@asynccontextmanager
async def time_limit(seconds: float) -> AsyncIterator[None]:
    """Bound a whole call (pool wait, connect, send, read): past it, ProviderError("timeout")."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError as exc:
        raise ProviderError("timeout", f"no answer within {seconds:.3g}s") from exc


async def post(
    client: httpx.AsyncClient, request: UpstreamRequest, secret: str | None
) -> tuple[int, Any]:
    """Status and decoded JSON body of a 2xx answer; run it inside ``time_limit``.

    ``secret`` is the key sent with the request, scrubbed from anything the provider echoes.
    """
    try:
        response = await client.post(
            request.path, content=orjson.dumps(request.body), headers={**_JSON, **request.headers}
        )
    except httpx.ConnectError as exc:
        raise ProviderError("connection", "cannot connect") from exc
    except httpx.DecodingError as exc:
        raise ProviderError("bad_response", "the body cannot be decoded") from exc
    except httpx.TransportError as exc:
        raise ProviderError("connection", f"connection lost ({type(exc).__name__})") from exc
    if not response.is_success:
        raise _error(response, secret)
    try:
        return response.status_code, orjson.loads(response.content)
    except orjson.JSONDecodeError as exc:
        raise ProviderError(
            "bad_response", "the body is not JSON", status=response.status_code
        ) from exc


def _error(response: httpx.Response, secret: str | None) -> ProviderError:
    code, message = _error_fields(response)
    if secret:
        message = message.replace(secret, "[redacted]")
    message = " ".join(message.split())[:MAX_DETAIL]
    return ProviderError(
        classify(response.status_code, code, message),
        message,
        status=response.status_code,
        retry_after=retry_after(response.headers),
    )


def _error_fields(response: httpx.Response) -> tuple[str | None, str]:
    """Code and message of an error body: ``{"error": {"message", "code" or "type"}}`` for both
    OpenAI and Anthropic; other servers' bodies are kept as text."""
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return None, response.text
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        code = error.get("code") or error.get("type")
        return (str(code) if code else None), str(error.get("message") or "")
    if isinstance(error, str):
        return None, error
    return None, response.text


def retry_after(headers: httpx.Headers) -> float | None:
    """Seconds from ``retry-after-ms`` (OpenAI) or ``retry-after`` (seconds or an HTTP date)."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time())
    except (TypeError, ValueError):
        return None
