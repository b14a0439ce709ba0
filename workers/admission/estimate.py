"""What a job will cost before it runs: tokens and USD, reserved now and settled after.

Prompt tokens are estimated as UTF-8 bytes / 4 (``text_size``) plus a few per message, with
no tokenizer: one tokenizer would be wrong for every other provider (Anthropic and self-hosted
models count differently), the rule is OpenAI's own rule of thumb for English (where a byte is
a character) and near enough for other scripts, and any error only affects the reservation,
which is settled with the provider's real usage after the call.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

import orjson

from queuegate.messages import ChatJob, prompt_cache_ttl
from queuegate.registry import TeamConfig
from queuegate.spend import capped_fallback, to_nano
from router.catalog import Catalog, Deployment
from router.pricing import cost
from router.providers.base import Usage, estimate_tokens, estimated_usage, text_size
from workers.admission.pdf_pages import PAGE_TOKENS, pdf_pages

PER_MESSAGE = 3
"""Tokens the chat format adds around each message (role, separators) on OpenAI's models."""
IMAGE_TOKENS = 2_700
"""What an image given by its URL is estimated at, and the most an image sent inline is: the
providers bill an image by its pixels, up to about 1,600 tokens at Anthropic, 1,105 at
OpenAI's tile-priced models (high detail), and 1,536 patches times 1.62-1.72 (2,490-2,650) at
its patch-priced ones; gpt-4o-mini bills up to 48,169, which the README names as a gap. The
URL says nothing of the image: counted as its characters, it was 20 tokens, and 200 such
images a job spent 12 budgets. An inline image (a data URL) is counted by its bytes up to
this: by its bytes alone, a 600 KB photo was 200,000 tokens, more than a tpm of 100,000
takes at once (refused as larger than the bucket), for a call billed 1,600."""
_PER_MTOK = Decimal(1_000_000)


@dataclass(frozen=True)
class Estimate:
    prompt_tokens: int
    output_tokens: int
    cost_nano: int
    """The dearest deployment along the job's chain: the worst case of its fallbacks."""
    room_nano: int
    """What the job may cost at most, priced as ``cost_nano``: that, for a job whose output
    limit bounds its output; at the output an unbounded job is assumed able to reach, where
    that is more (spend.lua admits such a job near its budget's edge only alone)."""
    cache_ttl: Literal["5m", "1h"] | None = None
    """How long the job marks its prompt to be cached (``prompt_cache_ttl``), None when it
    marks none: its prompt is reserved as written to it at the dearest prompt price
    (``_prompt_price``), and billed so at the mark's own (``usd_at``)."""

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens

    def usd_at(self, deployment: Deployment) -> Decimal:
        """What the estimated tokens cost at ``deployment``'s prices: what a call lost or
        not read is billed, its prompt written to a cache for as long as the job marks it,
        as an answer without counts is (before: at an hour's write price for a five-minute
        mark, 2x the input price at Anthropic for 1.25x)."""
        return cost(deployment, self.usage)

    @property
    def usage(self) -> Usage:
        """The estimated tokens as a call's usage (``estimated_usage``): the tokens a call
        lost or not read is billed for, on its job's row."""
        return estimated_usage(self.prompt_tokens, self.output_tokens, self.cache_ttl)


def _usd(deployment: Deployment, prompt: int, output: int, caches: bool) -> Decimal:
    per_prompt = _prompt_price(deployment) if caches else deployment.input_per_mtok
    return (prompt * per_prompt + output * deployment.output_per_mtok) / _PER_MTOK


def _prompt_price(deployment: Deployment) -> Decimal:
    """The dearest a prompt token marked for a cache is billed at: as written to it for an
    hour, for five minutes, or as input (``router.pricing.cost``). Priced as input, a job
    writing its prompt to a cache reserved half of what it cost (Anthropic bills an hour's
    write at 2x the input price, five minutes' at 1.25x): ten at once took a team 31 % past
    its budget."""
    prices = (
        deployment.input_per_mtok,
        deployment.cache_write_per_mtok,
        deployment.cache_write_1h_per_mtok,
    )
    return max(price for price in prices if price is not None)


def prompt_tokens(job: ChatJob) -> int:
    """The job's prompt: its messages, and every parameter it sends the provider but its
    ``user`` (a name, never read as tokens): the providers bill a ``response_format``'s
    schema, ``functions``, a ``prediction`` as they bill ``tools``, and an unknown parameter,
    passed through, may be read as any other. Left out, 400 KB of a schema was estimated as
    an empty request: a team spent 40 times its budget, and 333 times its tpm in a second."""
    # The bytes of text and JSON; the tokens of images and PDFs (``_media_tokens``).
    size, media = 0, 0
    for message in job.messages:
        content = message.content
        if isinstance(content, str):
            size += text_size(content)
        elif content is not None:
            for part in content:
                tokens = _media_tokens(part)
                if tokens is None:
                    size += len(orjson.dumps(part))
                else:
                    media += tokens
        # Every other field but its role is sent too: a ``name`` (which OpenAI bills), tool
        # calls, an assistant's ``refusal`` or ``audio`` given back (30,000 characters of a
        # name went uncounted, through a tpm of 3,000).
        extra = (message.model_extra or {}).values()
        size += _json_size(message.name, message.tool_calls, message.tool_call_id, *extra)
    params = job.params
    size += _json_size(
        params.stop,
        params.tools,
        params.tool_choice,
        params.response_format,
        *(params.model_extra or {}).values(),
    )
    return estimate_tokens(size) + PER_MESSAGE * len(job.messages) + media


def _json_size(*values: object) -> int:
    """The UTF-8 bytes of ``values``' JSON, those set (orjson writes it as UTF-8)."""
    return sum(len(orjson.dumps(value)) for value in values if value is not None)


def _media_tokens(part: dict[str, object]) -> int | None:
    """What a content part that is an image or a PDF is estimated at: the providers bill them
    by what their bytes do not show (an image by its pixels, a PDF by its pages). None for
    any other part, and for a PDF whose pages could not be counted (by its bytes, then)."""
    url = _image_url(part)
    if url is not None:
        inline = url.startswith("data:")
        return min(estimate_tokens(len(url)), IMAGE_TOKENS) if inline else IMAGE_TOKENS
    pages = _pdf_pages(part)
    return None if pages is None else pages * PAGE_TOKENS


def _pdf_pages(part: dict[str, object]) -> int | None:
    """The pages of a content part that is a PDF sent inline (a ``file`` part, as an
    Anthropic document is carried too), where they could be counted."""
    file = part.get("file")
    data = file.get("file_data") if part.get("type") == "file" and isinstance(file, dict) else None
    return pdf_pages(data) if isinstance(data, str) else None


def _image_url(part: dict[str, object]) -> str | None:
    """The URL of a content part that is an image (a ``data:`` URL for one sent inline)."""
    image = part.get("image_url")
    if part.get("type") != "image_url" or not isinstance(image, dict):
        return None
    url = image.get("url")
    return url if isinstance(url, str) else None


def estimate(
    job: ChatJob,
    catalog: Catalog,
    config: TeamConfig,
    default_output: int,
    unbounded_output: int | None = None,
) -> Estimate:
    """What admission reserves for ``job`` of a team with ``config``. Its output is, for each
    of its ``n`` choices (the provider bills them all), the job's ``max_tokens`` or
    ``max_completion_tokens``, else the team's expected output, else ``default_output`` (the
    gateway's ``expected_output_tokens``). Its room is its cost at ``unbounded_output`` per
    choice (the gateway's ``unbounded_output_tokens``) when it sets no output limit and that
    is more; its cost otherwise, and when ``unbounded_output`` is None (no room asked for)."""
    prompt, ttl = prompt_tokens(job), prompt_cache_ttl(job)
    caches = ttl is not None
    limit = job.params.output_limit
    choice = limit or config.expected_output_tokens or default_output
    output = choice * job.params.choices
    deployments = [
        d
        for alias in catalog.chain(job.model, job.fallbacks)
        if not capped_fallback(config, job.model, alias)  # never tried (Router.complete)
        for d in catalog.resolve(alias).deployments
    ]
    reserved = to_nano(max(_usd(d, prompt, output, caches) for d in deployments))
    room = reserved
    if limit is None and unbounded_output is not None and unbounded_output > choice:
        worst = unbounded_output * job.params.choices
        room = to_nano(max(_usd(d, prompt, worst, caches) for d in deployments))
    return Estimate(prompt, output, reserved, room, ttl)
