"""What every provider adapter does, and how every provider failure is classified.

An adapter is pure translation: ``build_request`` turns a canonical job (OpenAI chat format)
into the provider's HTTP request, ``parse_response`` turns the provider's JSON body into a
canonical OpenAI ``chat.completion`` and its token usage. The HTTP call itself lives in
``router.transport``, so retries, streaming and breakers can wrap it without touching adapters.

Every failure becomes a ``ProviderError`` whose ``error_class`` comes from the one table below,
which also says whether the router retries the deployment, moves on to the next one, and
whether the failure counts toward the deployment's circuit breaker.
"""

from __future__ import annotations

import base64
import functools
import html
import json
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

import orjson

from queuegate.errors import GatewayError
from queuegate.messages import ChatJob
from queuegate.provider_formats import ANTHROPIC_BODY
from queuegate.request_limits import MAX_NESTING, nests_deeper

MAX_DETAIL = 160
"""Characters of an upstream error message kept: enough to say what was wrong, no more."""
SCRUB_SPAN = 65_536
"""Characters of an upstream error message read by ``scrub``."""

ErrorClass = Literal[
    "timeout",
    "connection",
    "rate_limited",
    "server_error",
    "overloaded",
    "bad_request",
    "auth",
    "not_found",
    "context_length",
    "content_policy",
    "no_api_key",
    "unsupported",
    "bad_response",
    "misconfigured",
]


@dataclass(frozen=True)
class Handling:
    """What the router does after one failure of a class."""

    retries: bool
    """Worth calling the same deployment again (after a backoff)."""
    moves_on: bool
    """Worth trying the next deployment; False: every deployment would refuse it, the job fails."""
    trips_breaker: bool
    """Counts as a failure toward the deployment's circuit breaker."""


_TRANSIENT = Handling(retries=True, moves_on=True, trips_breaker=True)
_MISCONFIGURED = Handling(retries=False, moves_on=True, trips_breaker=True)
_NOT_HERE = Handling(retries=False, moves_on=True, trips_breaker=False)

HANDLING: dict[ErrorClass, Handling] = {
    # Transient on the provider's side: the same deployment may answer soon, another one now.
    "timeout": _TRANSIENT,
    "connection": _TRANSIENT,
    "server_error": _TRANSIENT,
    "overloaded": _TRANSIENT,
    # The provider is healthy and asks us to slow down: retried after its Retry-After, and the
    # deployment is paused for every worker instead, so it never counts as a breaker failure.
    "rate_limited": Handling(retries=True, moves_on=True, trips_breaker=False),
    # That deployment's configuration is wrong (key, account, model name, wire): every call
    # fails alike, so the breaker takes it out of rotation instead of each job learning it.
    "auth": _MISCONFIGURED,
    "not_found": _MISCONFIGURED,
    "bad_response": _MISCONFIGURED,
    "misconfigured": _MISCONFIGURED,  # the HTTP client refused the call: never sent
    "no_api_key": _NOT_HERE,  # no call was made
    # The request fits another model (bigger window, other content types) or another wire;
    # "unsupported" is found before sending: no call was made either.
    "context_length": _NOT_HERE,
    "unsupported": _NOT_HERE,
    # The caller's request is wrong (or refused for its content): every other deployment would
    # refuse it too, unless the catalog names a fallback for exactly this case.
    "bad_request": Handling(retries=False, moves_on=False, trips_breaker=False),
    "content_policy": Handling(retries=False, moves_on=False, trips_breaker=False),
}
"""How the router treats each failure class: the one table of retryable and final errors."""

UNSENT: frozenset[ErrorClass] = frozenset({"no_api_key", "unsupported", "misconfigured"})
"""Classes of failures found before anything reached the network: not counted as calls."""

_STATUS_CLASSES: dict[int, ErrorClass] = {
    400: "bad_request",
    401: "auth",
    402: "auth",  # Anthropic's billing_error: the account cannot be used
    403: "auth",
    404: "not_found",
    408: "timeout",
    409: "server_error",  # a conflict on the provider's side; Anthropic documents it as retryable
    413: "bad_request",  # Anthropic's request_too_large: the body itself is too big
    422: "bad_request",
    429: "rate_limited",
    503: "overloaded",
    529: "overloaded",  # Anthropic's overloaded_error
}

_CONTEXT_LENGTH_CODES = frozenset({"context_length_exceeded"})
_CONTENT_POLICY_CODES = frozenset({"content_policy_violation", "content_filter"})
_CONTEXT_LENGTH_TEXT = re.compile(
    r"context[ _-]?(length|window)|prompt is too long|too many (input )?tokens", re.IGNORECASE
)
"""OpenAI sends a code; Anthropic ("prompt is too long") and vLLM only say it in the message."""
_CONTENT_POLICY_TEXT = re.compile(r"content (management )?polic|safety system", re.IGNORECASE)
"""OpenAI's code, or its and Azure's wording when the code is missing."""


def classify(status: int, code: str | None = None, message: str = "") -> ErrorClass:
    """The error class of an HTTP error response (status, error code and message from its body)."""
    error_class = _STATUS_CLASSES.get(status)
    if error_class == "bad_request":
        if code in _CONTEXT_LENGTH_CODES or _CONTEXT_LENGTH_TEXT.search(message):
            return "context_length"
        if code in _CONTENT_POLICY_CODES or _CONTENT_POLICY_TEXT.search(message):
            return "content_policy"
    if error_class is not None:
        return error_class
    if status >= 500:
        return "server_error"
    # Anything else (another 4xx, a redirect) means this deployment does not speak our wire.
    return "bad_response"


class ProviderError(GatewayError):
    """One call to one deployment failed; the router records it and decides what comes next.

    The message is always ours (an upstream excerpt at most, with the key scrubbed), never an
    httpx error text or a request header.
    """

    def __init__(
        self,
        error_class: ErrorClass,
        detail: str = "",
        *,
        status: int | None = None,
        retry_after: float | None = None,
        param: str | None = None,
    ) -> None:
        self.error_class: ErrorClass = error_class
        self.detail = detail
        self.status = status
        self.param = param
        """The request's field the provider named as at fault (OpenAI's error ``param``)."""
        handling = HANDLING[error_class]
        self.retries = handling.retries
        self.moves_on = handling.moves_on
        self.trips_breaker = handling.trips_breaker
        self.retry_after = retry_after
        """Seconds the provider asked us to wait (Retry-After, retry-after-ms or the
        x-ratelimit-reset-* headers), if it said: a floor for the next call to the deployment."""
        head = f"{status} {error_class}" if status is not None else error_class
        super().__init__(f"{head}: {detail}" if detail else head)

    def answered(self, status: int) -> ProviderError:
        """This failure, of a call the provider answered with ``status`` (2xx) before it came
        (a bad or cut answer), unless it names a status of its own: so named, it is billed
        as an answer not read, the provider having made it (``workers.claims``)."""
        return ProviderError(
            self.error_class,
            self.detail,
            status=status if self.status is None else self.status,
            retry_after=self.retry_after,
            param=self.param,
        )


@dataclass(frozen=True)
class Usage:
    """Tokens of one call, by the class each is billed at.

    ``input_tokens`` counts every prompt token: the ``cached_tokens`` read from a prompt cache
    and the ``cache_write_tokens`` written to one (``cache_write_1h_tokens`` of them with a
    one-hour lifetime) included. ``output_tokens`` counts the ``reasoning_tokens`` too.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    reasoning_tokens: int = 0
    estimated: bool = False
    """Counted by the gateway from the text (its UTF-8 bytes / 4), because the provider sent no
    counts to bill by: a stream that broke before its end, or an answer without them; or its
    output billed at the request's limit, the count sent being past it (``within``)."""


def openai_usage(usage: Usage, sent: Any = None) -> dict[str, Any]:
    """``usage`` as a ``chat.completion``'s: cache and reasoning details when there are any.
    Over ``sent``, the provider's own usage object: its other fields and details kept, the
    counts it is billed by said as billed (``billed_counts``)."""
    sent = usage_kept(sent, ("prompt_tokens_details", "completion_tokens_details"))
    prompt = billed_counts(
        sent.get("prompt_tokens_details"),
        cached_tokens=usage.cached_tokens,
        cache_write_tokens=usage.cache_write_tokens,
    )
    completion = billed_counts(
        sent.get("completion_tokens_details"), reasoning_tokens=usage.reasoning_tokens
    )
    out: dict[str, Any] = sent | {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
    }
    if prompt or not sent:
        out["prompt_tokens_details"] = {"cached_tokens": usage.cached_tokens} | prompt
    if completion:
        out["completion_tokens_details"] = completion
    return out


def billed_counts(given: Any, **counts: int) -> dict[str, Any]:
    """A provider's usage details ``given`` with ``counts`` as billed: a count it sent is
    replaced (clamped, or no count: the answer said otherwise than the usage row), one it
    did not send is added unless 0; its other details are kept."""
    kept: dict[str, Any] = given if isinstance(given, dict) else {}
    return kept | {name: count for name, count in counts.items() if count or name in kept}


def within(usage: Usage, output_limit: int | None) -> Usage:
    """``usage`` with an output count past ``output_limit`` (``UpstreamRequest``) not
    believed: billed at that limit, ``estimated``. The provider cannot have generated more,
    so the limit never bills less than it did, and a job that set the limit no more than
    admission reserved for it (its estimate is that limit). Billed by its text instead,
    OpenAI's reasoning (never sent) would be free, and a text as long as the claim billed as
    much. Believed, 10^7 tokens claimed for a job of ``max_tokens`` 50 cost $20 on a $1 budget."""
    if output_limit is None or usage.output_tokens <= output_limit:
        return usage
    return replace(
        usage,
        output_tokens=output_limit,
        reasoning_tokens=min(usage.reasoning_tokens, output_limit),
        estimated=True,
    )


def text_size(text: str) -> int:
    """What ``text`` counts for in a token estimate (``estimate_tokens``): its UTF-8 bytes,
    which are its characters for ASCII (told without encoding it). Characters / 4 is OpenAI's
    rule of thumb for English; a CJK character, a token or more, is three bytes, so bytes / 4
    counts it 0.75 of a token where characters / 4 counted it 0.25 (10,000 CJK characters
    were estimated at 2,500 tokens), and an emoji, four bytes, a token."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def estimate_tokens(size: int) -> int:
    """Tokens of text of ``size`` (``text_size``) when no one counted them: size / 4, rounded
    up (OpenAI's rule of thumb for English, the admission estimate's too)."""
    return -(-size // 4)


def estimated_usage(prompt: int, output: int, ttl: Literal["5m", "1h"] | None) -> Usage:
    """The usage of a call the gateway counted itself: ``prompt`` and ``output`` tokens,
    the prompt as written to a cache for ``ttl`` when the job marks one
    (``prompt_cache_ttl``), as a provider that wrote it bills it. An answer without counts
    is billed by it (``Router``), and a call lost or not read at the job's estimate
    (``Estimate.usd_at``)."""
    return Usage(
        prompt,
        output,
        cache_write_tokens=prompt if ttl else 0,
        cache_write_1h_tokens=prompt if ttl == "1h" else 0,
        estimated=True,
    )


@dataclass(frozen=True)
class Completion:
    """A provider's answer in canonical form: an OpenAI ``chat.completion`` dict and its usage."""

    response: dict[str, Any]
    usage: Usage | None
    """None when the provider sent no counts to bill by (none, or none readable:
    ``token_count``): the router counts them from the text, as a broken stream's."""


@dataclass(frozen=True)
class UpstreamRequest:
    """One HTTP POST to a provider, relative to the deployment's api_base."""

    path: str
    body: dict[str, Any]
    headers: dict[str, str] = field(repr=False)
    """Kept out of repr: they carry the API key."""
    dropped: tuple[str, ...] = ()
    """Parameters of the job the provider cannot take, left out (the job allowed it)."""
    changed: tuple[str, ...] = ()
    """Parameters of the job sent with another value than asked (the job allowed it)."""
    output_limit: int | None = None
    """The most output tokens the provider generates for it, its choices together (reasoning
    included): its ``max_tokens`` (or ``max_completion_tokens``) times its ``n``; None when
    it sets none. No answer to it holds more (``within``)."""


@dataclass
class Fidelity:
    """What one translation could not carry over as asked, under the job's policy::

    fidelity = Fidelity("anthropic", drop=False)
    fidelity.unsupported("seed")  # raises ProviderError("unsupported") naming it
    """

    provider: str
    drop: bool
    dropped: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    def unsupported(self, param: str, why: str = "") -> None:
        """``param`` cannot be sent: refused, or noted as dropped."""
        if not self.drop:
            why = why or "not supported"
            raise ProviderError("unsupported", self._refusal(param, why, "drop it"))
        if param not in self.dropped:
            self.dropped.append(param)

    def change(self, param: str, why: str) -> None:
        """``param`` can only be sent with another value: refused, or noted as changed."""
        if not self.drop:
            raise ProviderError("unsupported", self._refusal(param, why, "change it"))
        if param not in self.changed:
            self.changed.append(param)

    def _refusal(self, param: str, why: str, instead: str) -> str:
        return f"{param}: {why} on {self.provider} (unsupported_params: drop would {instead})"


def request(
    path: str,
    body: dict[str, Any],
    headers: dict[str, str],
    fidelity: Fidelity,
    output_limit: int | None,
) -> UpstreamRequest:
    """The request, with what ``fidelity`` noted as dropped and changed."""
    return UpstreamRequest(
        path,
        body,
        headers,
        dropped=tuple(fidelity.dropped),
        changed=tuple(fidelity.changed),
        output_limit=output_limit,
    )


@dataclass(frozen=True)
class ServerEvent:
    """One server-sent event of a streamed answer: its ``event:`` name (or None) and data."""

    name: str | None
    data: str


Delta = dict[str, Any]
"""A canonical stream delta: the ``delta`` of an OpenAI ``chat.completion.chunk`` choice."""


@dataclass(frozen=True)
class Piece:
    """What a stream parser relays: a delta, the choice it belongs to (``index``: more than
    one with ``n`` > 1), that choice's ``logprobs`` for it when the provider sent them, and
    the chunk fields the provider has sent so far (``queuegate.provider_formats.CHUNK_FIELDS``).
    An Anthropic deployment's piece also carries the Messages stream events it was read from
    (``anthropic_events``; a piece of those alone has an empty delta), so that an Anthropic
    caller gets them as sent; the delta itself stays canonical."""

    delta: Delta
    index: int = 0
    logprobs: dict[str, Any] | None = None
    chunk: dict[str, Any] = field(default_factory=dict)
    anthropic_events: list[dict[str, Any]] | None = None


class StreamParser(Protocol):
    """Reads one streamed answer, event by event, into canonical deltas and a completion."""

    @property
    def model(self) -> str:
        """The model the provider says is answering (the upstream name asked for until it
        says): the ``model`` of the completion, reported with each delta."""
        ...

    def feed(self, event: ServerEvent) -> list[Piece]:
        """The pieces carrying content, a refusal, tool calls or logprobs in ``event`` (often
        none); raises ProviderError for an error event or a malformed one."""
        ...

    @property
    def ended(self) -> bool:
        """Whether an event fed so far ended the stream (OpenAI's ``[DONE]``, Anthropic's
        ``message_stop``): nothing comes after it but the completion."""
        ...

    def completion(self) -> Completion:
        """The whole answer, as if it had not been streamed, with the usage the provider
        reported; raises ProviderError("bad_response") when the stream ended early."""
        ...

    def received(self, prompt_size: int, ttl: Literal["5m", "1h"] | None) -> Usage:
        """What a stream that broke has used so far: the provider's counts where it sent
        them, else estimated (``estimated_usage``) from the text received and from
        ``prompt_size``, the prompt's ``text_size``, written to a cache for ``ttl`` when
        the job marks one (``prompt_cache_ttl``), as every estimate of a call prices it."""
        ...


class Adapter(Protocol):
    """Translates between the canonical job/response and one provider's wire format."""

    def build_request(
        self,
        job: ChatJob,
        model: str,
        api_key: str | None,
        *,
        stream: bool = False,
        drop: bool = False,
    ) -> UpstreamRequest:
        """The request for ``model`` (the upstream name), streamed when ``stream``; raises
        ProviderError("unsupported") for what the provider cannot take, or with ``drop``
        leaves out what can be left out and notes it on the request."""
        ...

    def parse_response(self, body: Any, model: str, *, choices: int = 1) -> Completion:
        """The canonical completion of a 2xx body answering a job of ``choices`` choices
        (``n``); raises ProviderError("bad_response"), for a field of the wrong type or a
        choice the job did not ask for too."""
        ...

    def stream_parser(self, model: str, secret: str | None, *, choices: int = 1) -> StreamParser:
        """A parser for one streamed answer from ``model`` to a job of ``choices`` choices;
        ``secret``, the key the call carried, is scrubbed from the errors the stream may
        carry and from its events (``json_data``)."""
        ...


def json_data(event: ServerEvent, secret: str | None) -> dict[str, Any]:
    """The JSON object an event carries, the key the call carried (``secret``) redacted from
    it when it echoes it (``echoed``): parsed once, before anything reads it. Raises
    ProviderError("bad_response"), naming none of the event's text.
    Read by orjson (1 µs for a chunk of text, against 3 µs for ``json``: the parse is most of
    a stream's cost per event); what it refuses but JSON allows (a lone surrogate escaped,
    ``NaN``) is read by ``json``, as it was before."""
    text = event.data
    data: Any
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:
        data = _json_loads(text)
    if not isinstance(data, dict):
        raise ProviderError("bad_response", "a stream event is not a JSON object")
    # Only an event of more brackets than the bound can nest past it: the rest are not walked.
    if text.count("{") + text.count("[") > MAX_NESTING and nests_deeper(data, MAX_NESTING):
        # Relayed as it came (Anthropic's events ride on their pieces), it failed the
        # worker writing its chunk, the stream's calls billed nothing.
        deep = f"the answer nests deeper than {MAX_NESTING} levels (a stream event)"
        raise ProviderError("bad_response", deep)
    said: dict[str, Any] = data
    if secret is not None and echoed(text, secret, said):
        said = _unechoed(said, secret.strip())  # no deeper than MAX_NESTING, as checked
    return said


def _json_loads(text: str) -> Any:
    """An event orjson refused, read by ``json``; its lone surrogates, which only an escape
    can make and no UTF-8 can hold, as U+FFFD."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        # Nested past the parser's depth, it failed the job as the worker's own fault, billed
        # nothing for the text already streamed: a stream that broke, billed as one.
        raise ProviderError("bad_response", "a stream event is not JSON") from exc
    return _each_string(data, writable) if _SURROGATE_ESCAPE.search(text) else data


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def writable(text: str) -> str:
    """``text`` with its lone surrogates (which JSON may escape, and no UTF-8 can hold) as
    U+FFFD: kept, the result holding it could not be written, its call recorded nowhere."""
    if text.isascii():
        return text
    try:
        text.encode()
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    return text


def text_of(value: Any, what: str) -> str:
    """A text field of a provider's answer or stream event, "" when absent; raises
    ProviderError("bad_response") when it is no string (content 42): taken, it failed the
    worker inside the parser, the call billed and recorded nowhere."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ProviderError("bad_response", f"{what} is not a string")
    return value


def texts_of(value: dict[str, Any], fields: tuple[str, ...], what: str) -> None:
    """Raises ProviderError("bad_response") when one of ``fields`` of ``value`` is there and
    no string (``text_of``; null is none, as the providers document their nullable ones):
    relayed, a caller's answer said model 42, a finish_reason 5 or a fingerprint {}."""
    for name in fields:
        text_of(value.get(name), f"{what}'s {name}")


def whole_of(value: Any, what: str) -> int:
    """A whole-number field of a provider's answer or stream event (an index, a time), 0 when
    absent; raises ProviderError("bad_response") when it is no int from 0 (true and "zero"
    neither), as ``text_of``: read as 0, a chunk of choice "zero" was relayed as the first."""
    if value is None:
        return 0
    if type(value) is not int or value < 0:
        raise ProviderError("bad_response", f"{what} is not a whole number")
    return value


def list_of(value: Any, what: str) -> list[Any]:
    """A list of a provider's answer or stream event, [] when absent or null; raises
    ProviderError("bad_response") when it is no list, as ``text_of``."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ProviderError("bad_response", f"{what} is not a list")
    return value


def usage_kept(sent: Any, objects: tuple[str, ...], texts: tuple[str, ...] = ()) -> dict[str, Any]:
    """A provider's usage object ``sent`` ({} when it is none) without those of its
    ``objects`` (details) that are no object, nor of its ``texts`` that are no string (null
    kept): read as absent, as a count that is no count is (a usage is never refused: what
    cannot be read is estimated), and so never relayed. Relayed, a caller's answer said
    ``prompt_tokens_details: "x"``, which failed the front door's Messages answer of it."""
    if not isinstance(sent, dict):
        return {}
    wrong = {name for name in objects if not isinstance(sent.get(name), dict | None)}
    wrong |= {name for name in texts if not isinstance(sent.get(name), str | None)}
    return {name: value for name, value in sent.items() if name not in wrong}


def object_of(value: Any, what: str) -> dict[str, Any]:
    """An object of a provider's answer or stream event, {} when absent; raises
    ProviderError("bad_response") when it is no object, as ``text_of``."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProviderError("bad_response", f"{what} is not an object")
    return value


def stream_error(error: Any, secret: str | None) -> ProviderError:
    """The ProviderError of an error sent inside a stream (after a 200 status); ``secret`` is
    the key the call carried, scrubbed from the message."""
    if not isinstance(error, dict):
        return ProviderError("server_error", "the stream carried an error")
    kind = str(error.get("type") or error.get("code") or "")
    message = scrub(str(error.get("message") or kind), secret)
    return ProviderError(
        _STREAM_ERRORS.get(kind, "server_error"), message, param=error_param(error, secret)
    )


def error_param(error: dict[str, Any], secret: str | None) -> str | None:
    """The ``param`` of an OpenAI error object (the request's field at fault), when it names
    one; scrubbed as the message is, since it is the provider's text too."""
    param = error.get("param")
    return (scrub(param, secret) or None) if isinstance(param, str) else None


def scrub(text: str, secret: str | None) -> str:
    """Provider-originated text as it may be kept and shown: Unicode format characters
    (category Cf: zero-width spaces, joiners, bidi marks) removed, whitespace collapsed to
    single spaces, then the key redacted, then cut to ``MAX_DETAIL`` characters.

    Redacted is any run of at least ``_run_length`` characters (12, fewer for a short key:
    more than half of it, 4 at least, so a key under 4 characters is not looked for) that is
    a piece of the key, of its hex, or of its base64 encoding at any of the three byte
    alignments (standard or URL-safe alphabet), compared without regard to case, to
    whitespace inside the run, to characters written percent-encoded or as HTML character
    references, or to one character put between each two: the whole key, its prefix or
    suffix, the key split across lines, upper-cased, URL-encoded, HTML-escaped, hex- or
    base64-encoded, or spelt out with dots between its characters.
    Every text a provider sends back (an error body, a stream's error event) passes here, in
    this order: collapsing after redacting would let a key split across lines through, and
    cutting before redacting could keep part of it."""
    # Only the first MAX_DETAIL characters are kept, so the rest of a huge body is not worth
    # the time: a redaction turns at most some 40 characters per key character (a long named
    # reference such as &DiacriticalGrave;, a space, a separator and its space) into ten, so
    # for any key under 100 characters the first SCRUB_SPAN still make more than MAX_DETAIL.
    text = text[:SCRUB_SPAN]
    if not text.isascii():
        text = "".join(char for char in text if unicodedata.category(char) != "Cf")
    text = " ".join(text.split())
    return redact(text, secret)[:MAX_DETAIL]


def redact(text: str, secret: str | None) -> str:
    """``text`` with every run of the key ``scrub`` describes as ``[redacted]``, the rest of it
    as it was."""
    if not (secret and secret.strip()):
        return text
    pieces, kept = [], 0
    for start, end in _key_spans(text, _needles(secret.strip())):
        pieces += [text[kept:start], "[redacted]"]
        kept = end
    return "".join([*pieces, text[kept:]])


def echoed(sent: str | bytes, secret: str, decoded: Any) -> bool:
    """Whether ``sent``, an answer or one stream event as the provider sent it (JSON), which
    decodes to ``decoded``, holds ``secret``: one search of ``sent`` for the key as JSON
    writes it, so that every successful answer can be looked at before it is relayed, kept or
    traced, and only one that echoes the key is read again (``unechoed``). Measured (timeit,
    keys of 51 to 168 characters): 1.2 µs for an answer of 1 KB, 5 to 12 µs for one of 100 KB
    (parsing it takes 110 µs), 0.5 µs per stream event.
    That search is exact only for a text without a ``\\u`` escape: the key may be written
    with some or all of its characters so (``sk-\\u0050ROV``), which no search of the raw
    text finds. Where ``sent`` holds one, ``decoded``'s strings are walked for the key: 14 µs
    more for an answer of 176 KB whose accents are all escaped, 0.5 µs more per such event.
    A string that holds a ``\\u`` escape as text (JSON text inside a string: tool arguments,
    an Anthropic stream's ``partial_json``, whose escapes' backslashes are escaped) is looked
    at with its escapes decoded too (``_revealed``): decoding it, the gateway or its caller
    had the key. Only the whole key is looked for: one cut across two stream events passes
    in the events (the answer they make is looked at whole, ``kept``), one sent only
    upper-cased, hex- or base64-encoded passes."""
    written = _written(secret)
    if written is None:
        return False
    if isinstance(sent, bytes):
        if written.encode() in sent:
            return True
        escaped = b"\\u" in sent or b"\\/" in sent
    else:
        if written in sent:
            return True
        escaped = _escapes(sent)
    return escaped and _holds(decoded, secret.strip())


def _holds(value: Any, key: str) -> bool:
    """Whether a string of ``value`` (an object's keys too) holds ``key``. Walked without
    recursion: an answer may nest deeper than Python recurses (orjson decodes 1024 levels)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if key in item or (_escapes(item) and key in _revealed(item)):
                return True
        elif isinstance(item, list):
            stack += item
        elif isinstance(item, dict):
            stack += item
            stack += item.values()
    return False


@functools.lru_cache(maxsize=64)
def _written(secret: str) -> str | None:
    """The key as it is written inside a JSON string; None for one too short to look for
    (``SHORTEST_RUN``): a placeholder such as ``x`` is in almost every answer."""
    key = secret.strip()
    return json.dumps(key, ensure_ascii=False)[1:-1] if len(key) >= SHORTEST_RUN else None


def unechoed(answer: Any, secret: str) -> Any:
    """``answer``, a provider's decoded answer that ``echoed`` the key (a stream event's is
    redacted in ``json_data``), with every string holding the key (an object's keys too)
    redacted as ``redact`` does, the rest as it was: some 5 ms per KB of those strings, paid
    only by an answer that echoes the key.
    One nested deeper than ``MAX_NESTING`` is left as it came: it is refused as a bad
    response, never relayed or kept."""
    if nests_deeper(answer, MAX_NESTING):
        return answer
    return _unechoed(answer, secret.strip())


def kept(completion: Completion, secret: str | None) -> Completion:
    """``completion``, a stream parser's or an adapter's of a whole answer, with the key
    redacted as ``unechoed`` does when a string of it holds the key: each event was looked at
    alone (``json_data``), so a key cut across two was relayed in its pieces, but the answer
    they make is kept, stored and traced whole; a whole answer was looked at as sent
    (``echoed``), but its adapter joins texts (an Anthropic answer's content blocks) into
    one, which may hold the key cut across them. Its strings are walked (``_holds``) rather
    than it written as JSON to be searched: a few µs once per answer, and nothing a stream
    event could carry (an integer past 64 bits) fails it."""
    if secret is None or _written(secret) is None:
        return completion
    if not _holds(completion.response, secret.strip()):
        return completion
    response = unechoed(completion.response, secret)
    # The provider's own message, kept beside it for an Anthropic caller, holds the key cut
    # across the blocks the text was joined of, which no walk finds: left out, that caller's
    # answer is made from the redacted text, as another provider's is. Before, it and its
    # copies in the stored result and the cache served the pieces.
    response.pop(ANTHROPIC_BODY, None)
    return replace(completion, response=response)


def _unechoed(value: Any, key: str) -> Any:
    return _each_string(value, functools.partial(_unechoed_text, key=key))


def _unechoed_text(text: str, key: str) -> str:
    if key in text:
        text = redact(text, key)
    if not (_escapes(text) and key in (revealed := _revealed(text))):
        return text
    # JSON text (tool arguments) is redacted string by string, each decoded: the rest of it
    # means what it did. Decoding the whole text's escapes instead decoded its other
    # strings' escapes written as text too (a string "\\u0041" of it came out "A").
    redacted = _unechoed_json(text, key)
    if redacted is not None and key not in _revealed(redacted):
        return redacted
    # Any other text is redacted where its escapes are decoded faithfully, so it means what
    # it did but for the key; where only decoding loosely shows the key (its escapes'
    # backslashes escaped so), it is redacted there.
    unescaped = _unescaped(text)
    return redact(unescaped if key in unescaped else revealed, key)


def _unechoed_json(text: str, key: str) -> str | None:
    """``text`` with each of its strings (an object's names too) redacted as
    ``_unechoed_text`` does, decoded, when one holds ``key``, the rest as it was; None when
    it is no JSON text."""
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return None
    return _JSON_STRING.sub(functools.partial(_unechoed_string, key=key), text)


_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
"""A string of a JSON text: outside one, no JSON text holds a ``"``."""


def _unechoed_string(written: re.Match[str], key: str) -> str:
    if key not in written[0] and not _escapes(written[0]):
        return written[0]
    text = json.loads(written[0])
    redacted = _unechoed_text(text, key)
    if redacted == text:
        return written[0]
    # Its non-ASCII characters as they are, but a lone surrogate (escaped in the text, no
    # UTF-8 holds it) escaped as it was.
    return json.dumps(redacted, ensure_ascii=bool(_SURROGATE.search(redacted)))


def _each_string(value: Any, change: Callable[[str], str]) -> Any:
    """``value`` (decoded JSON) with ``change`` made to each of its strings, an object's keys
    too; the rest as it was."""
    if isinstance(value, str):
        return change(value)
    if isinstance(value, list):
        return [_each_string(item, change) for item in value]
    if isinstance(value, dict):
        return {change(name): _each_string(item, change) for name, item in value.items()}
    return value


def _escapes(text: str) -> bool:
    """Whether ``text`` holds an escape the key may hide behind: a ``\\u`` one, or ``\\/``,
    which JSON allows for a ``/`` (keys with one, as AWS-style secrets, were found only as
    written plain)."""
    return "\\u" in text or "\\/" in text


def _unescaped(text: str) -> str:
    """``text`` with its ``\\u`` escapes of printable characters (but ``"`` and ``\\``)
    decoded, at whatever level of JSON text it holds they are: a string that holds JSON text
    (an Anthropic stream's ``partial_json``, a piece of tool arguments) writes its own
    escapes' backslashes escaped, ``\\\\u0073``, and decoded there the key reached the caller
    as it was sent (one level of decoding leaves ``\\u0073``: text, not the key). One pass,
    never longer than ``text``; JSON text stays valid at every level, though a string of it
    writing an escape as text (``"\\\\u0041"``) is decoded too: a string that is JSON text
    whole is redacted string by string instead (``_unechoed_json``)."""
    return _JSON_ESCAPE.sub(_decoded_escape, text)


_JSON_ESCAPE = re.compile(r"(?<!\\)(\\+)(?:u([0-9a-fA-F]{4})|/)")
"""A run of backslashes before a ``u`` and 4 hex digits (or a ``/``), from its first: tried
from each of its backslashes, a long run with no escape after it took time growing as its
square."""


def _decoded_escape(escape: re.Match[str]) -> str:
    # A run of 2^k backslashes before the u is an escape k levels of JSON text deeper; more
    # generally, the run's lowest set bit says the level, and the backslashes above it stand
    # for backslashes of their own (escaped at each level), kept.
    run = len(escape[1])
    char = "/" if escape[2] is None else chr(int(escape[2], 16))
    if char in '"\\' or not char.isprintable():
        return escape[0]
    return "\\" * (run - (run & -run)) + char


def _revealed(text: str) -> str:
    """``text`` with every ``\\u`` escape, however many backslashes before it, decoded to its
    character, and one whose backslash is itself written as an escape (``\\u005cu0073``)
    too: what ``_unescaped`` keeps as it was but decoding may still make of it. One pass,
    never longer than ``text`` (a backslash written so stands for ever more of them, level by
    level: decoded faithfully, a chain of them doubled the text at each). A surrogate's
    escape is kept as it is: decoded alone, half of a pair, it made the text unwritable (no
    UTF-8 holds it), and the job's outcome with it, and no key has one."""
    return _LOOSE_ESCAPE.sub(_loosely_decoded, text)


def _loosely_decoded(escape: re.Match[str]) -> str:
    if escape[1] is None:
        return "/"
    char = chr(int(escape[1], 16))
    return escape[0] if _SURROGATE.match(char) else char


_LOOSE_ESCAPE = re.compile(r"(?<!\\)\\+(?:u005[cC]\\*)*(?:u([0-9a-fA-F]{4})|/)")


MIN_RUN = 12
"""Characters of the key (or of its base64) that are never let through together."""
SHORTEST_RUN = 4
"""The shortest run redacted, whatever the key: a key of 1 to 3 characters (a placeholder:
``x``, ``sk``) guards nothing, and its runs, letters, masked every letter of its kind in every
error (``inj[redacted]ct[redacted]d`` for a key ``x``, whose base64 begins with ``e``)."""


def _run_length(needle: str) -> int:
    """The shortest run of ``needle`` redacted: ``MIN_RUN``, or more than half a short one,
    never under ``SHORTEST_RUN`` (a form shorter than that is not looked for)."""
    return max(SHORTEST_RUN, min(MIN_RUN, len(needle) // 2 + 1))


@dataclass(frozen=True)
class _Needle:
    """One form of a key to look for: lower-cased, with every run of its redacted length."""

    text: str
    run: int
    grams: frozenset[str]


@functools.lru_cache(maxsize=64)
def _needles(secret: str) -> tuple[_Needle, ...]:
    """The forms of ``secret`` to look for, computed once per key: the key itself, its hex,
    then its base64 at each of the three byte alignments. Each base64 form keeps only the
    characters that do not depend on the bytes around the key (a key inside a longer encoded
    text)."""
    if len(secret) < SHORTEST_RUN:
        return ()  # its hex and base64 neither: "abc" masked every "6162" of an error
    raw = secret.encode("utf-8")
    forms = {secret, raw.hex()}
    for offset in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            encoded = encode(b"\0" * offset + raw).decode("ascii")
            # The first characters also carry the bits of the bytes before the key, the last
            # ones those after it (or the padding).
            head = -(-offset * 4 // 3)
            tail = (offset + len(raw)) * 4 // 3
            forms.add(encoded[head:tail])
    needles = []
    for form in sorted(forms):
        lowered = form.lower()
        run = _run_length(lowered)
        if run <= len(lowered):
            grams = frozenset(lowered[i : i + run] for i in range(len(lowered) - run + 1))
            needles.append(_Needle(lowered, run, grams))
    return tuple(needles)


def _key_spans(text: str, needles: tuple[_Needle, ...]) -> list[tuple[int, int]]:
    """The spans of ``text`` to redact, merged and in order."""
    seen, where = _compared(text)
    found: list[tuple[int, int]] = []
    # Step 1 reads the text as it runs; step 2 reads every other character, from the first and
    # from the second, so a key written with one character between each two of its own
    # (s.k.-.p, s-k---p) is read as the key.
    for step in (1, 2):
        for first in range(step):
            view = seen[first::step]
            for needle in needles:
                for start, end in _runs(view, needle):
                    found.append(
                        (where[first + start * step][0], where[first + (end - 1) * step][1])
                    )
    merged: list[tuple[int, int]] = []
    for start, end in sorted(found):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def _compared(text: str) -> tuple[str, list[tuple[int, int]]]:
    """``text`` as compared: lower-cased, whitespace left out, %XX escapes and HTML character
    references decoded; with the span of ``text`` each compared character comes from."""
    chars: list[str] = []
    where: list[tuple[int, int]] = []
    i = 0
    while i < len(text):
        char = text[i]
        escape = (char == "%" and _PERCENT.match(text, i)) or (
            char == "&" and _REFERENCE.match(text, i)
        )
        decoded = _decoded(escape.group()) if escape else ""
        if escape and len(decoded) == 1:
            chars.append(decoded.lower())
            where.append((i, escape.end()))
            i = escape.end()
            continue
        if not char.isspace():
            lowered = char.lower()  # one character for one: İ lowers to two
            chars.append(lowered if len(lowered) == 1 else char)
            where.append((i, i + 1))
        i += 1
    return "".join(chars), where


def _decoded(escape: str) -> str:
    """The character a %XX escape or an HTML character reference stands for."""
    if escape.startswith("%"):
        return chr(int(escape[1:], 16))
    return html.unescape(escape if escape.endswith(";") else f"{escape};")


def _runs(seen: str, needle: _Needle) -> list[tuple[int, int]]:
    """The spans of ``seen`` (indexes into it) that are runs of ``needle``, each as long as
    it goes."""
    runs: list[tuple[int, int]] = []
    reach = 0  # the end of the last run found: any piece of a run is in the needle too
    for start in range(len(seen) - needle.run + 1):
        if seen[start : start + needle.run] not in needle.grams:
            continue
        end = max(start + needle.run, reach)
        while end < len(seen) and seen[start : end + 1] in needle.text:
            end += 1
        if end > reach:
            runs.append((start, end))
            reach = end
    return runs


_PERCENT = re.compile(r"%[0-7][0-9a-fA-F]")
"""A percent-encoded ASCII character (a key is ASCII)."""

_REFERENCE = re.compile(r"&(?:#[xX][0-9a-fA-F]{1,6};?|#[0-9]{1,7};?|[A-Za-z][A-Za-z0-9]{1,31};)")
"""An HTML character reference: &#x73; or &#115; (browsers read them without the ``;``
too), or a named one such as &period; (only with its ``;``: without it, only a few old
names are read, and ``&`` followed by a word is more often just text)."""


_STREAM_ERRORS: dict[str, ErrorClass] = {
    "overloaded_error": "overloaded",
    "rate_limit_error": "rate_limited",
    "rate_limit_exceeded": "rate_limited",
    "invalid_request_error": "bad_request",
    "timeout_error": "timeout",
}
"""Error types sent in a stream (Anthropic's ``event: error``, OpenAI's ``{"error": ...}``)."""
