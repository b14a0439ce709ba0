"""The model catalog: aliases that jobs name, their deployments, and their fallbacks.

Loaded from YAML with ``load_catalog``, which interpolates ``${VAR}`` and ``${VAR:-default}``
in string values from the environment it is given (not ``os.environ`` behind the caller's back)::

    models:
      gpt-4o-mini:
        fallbacks: [claude-haiku]
        deployments:
          - name: openai-main
            provider: openai
            model: gpt-4o-mini
            api_base: ${OPENAI_BASE:-https://api.openai.com}
            api_key_env: OPENAI_API_KEY
            input_per_mtok: 0.15
            output_per_mtok: 0.60
            cached_input_per_mtok: 0.075

Keys never live in the catalog: it names the environment variable (``api_key_env``) or the
secret file (``api_key_file``) that holds each one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator
from yarl import URL

from queuegate.errors import ConfigError, UnknownModel
from queuegate.messages import UnsupportedParams
from queuegate.visible import clipped_path
from router.policies import BreakerPolicy, Count, Resilience, RetryPolicy, Seconds

ProviderKind = Literal["openai", "anthropic", "openai_compatible"]
Routing = Literal["ordered", "weighted", "least_in_flight"]

MAX_PRICE = Decimal(10_000)
"""The highest price the catalog takes, in USD per million tokens: far above any model's,
and low enough that a job's cost always fits the spend columns and counters."""

Price = Annotated[Decimal, Field(ge=0, le=MAX_PRICE, allow_inf_nan=False)]
"""USD per million tokens of one class."""

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Strict(BaseModel):
    # A misspelt field (or a key pasted inline as `api_key:`) is refused, not ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Deployment(_Strict):
    """One place a model is served: a provider account, its upstream model name and prices."""

    name: str = Field(min_length=1)
    """Unique across the catalog; recorded on every attempt."""
    provider: ProviderKind
    model: str = Field(min_length=1)
    """The upstream model name sent to the provider."""
    api_base: str = Field(pattern=r"^https?://[^/\s]+")
    """Scheme and host (and port); the provider's path is appended to it."""
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """The environment variable that holds the key; only ``openai_compatible`` may go without."""
    api_key_file: Path | None = None
    """Or a file that holds it (a mounted secret), read at each call so rotation needs no
    restart; surrounding whitespace is ignored."""
    input_per_mtok: Price
    """USD per million input tokens."""
    output_per_mtok: Price
    """USD per million output tokens (reasoning tokens included: providers bill them so)."""
    cached_input_per_mtok: Price | None = None
    """USD per million input tokens read from the prompt cache (OpenAI's cached input,
    Anthropic's cache reads); unset, ``input_per_mtok``."""
    cache_write_per_mtok: Price | None = None
    """USD per million input tokens written to the prompt cache (Anthropic's 5-minute cache
    writes); unset, ``input_per_mtok``."""
    cache_write_1h_per_mtok: Price | None = None
    """USD per million input tokens written to Anthropic's one-hour cache; unset,
    ``cache_write_per_mtok``."""
    timeout: Seconds = Field(default=60.0, gt=0)
    """Seconds one call may take in total, connection included; for a stream, the wait for
    its first bytes and then for each next read (its job's deadline bounds the whole)."""
    rpm: Count | None = None
    """The provider account's requests per minute for this model; workers keep under it."""
    burst: Count | None = None
    """Calls workers may start at once after a quiet spell (the requests bucket's capacity);
    unset, half a second of ``rpm``. Providers enforce a per-minute limit over much shorter
    periods (OpenAI: 60,000 RPM may be enforced as 1,000 requests a second), so a minute's
    worth at once would meet 429s; half a second leaves room for calls admitted together to
    reach the provider apart. Raise it only for a provider known to allow larger bursts."""
    tpm: Count | None = None
    """The provider account's tokens per minute for this model; workers keep under it."""
    connect_timeout: Seconds = Field(default=5.0, gt=0)
    """Seconds to open a connection (a pooled keep-alive one needs none)."""
    first_byte_timeout: Seconds | None = Field(default=None, gt=0)
    """Seconds until the response starts (headers; for a stream, its first event)."""
    weight: Count = 1
    """Share of the alias's traffic under ``weighted`` routing."""
    max_in_flight: Count | None = None
    """Calls one worker runs on this deployment at once; more wait or go elsewhere."""
    retry: RetryPolicy | None = None
    """Overrides the catalog's ``resilience.retry`` for this deployment."""
    breaker: BreakerPolicy | None = None
    """Overrides the catalog's ``resilience.breaker`` for this deployment."""

    @property
    def limited(self) -> bool:
        """Whether the catalog gives the provider account's own limits (``rpm``, ``tpm``):
        calls to it wait for their buckets."""
        return self.rpm is not None or self.tpm is not None

    @property
    def request_burst(self) -> int | None:
        """The requests bucket's capacity: ``burst``, or half a second of ``rpm`` (at least 1)."""
        if self.rpm is None:
            return None
        return self.burst or math.ceil(self.rpm / 120)

    @model_validator(mode="after")
    def _burst_within_rpm(self) -> Deployment:
        if self.burst is None:
            return self
        if self.rpm is None:
            raise ValueError("burst: set rpm too (burst is the capacity of its bucket)")
        if self.burst > self.rpm:
            raise ValueError(f"burst: {self.burst} is more than rpm ({self.rpm}), a minute's worth")
        return self

    @model_validator(mode="after")
    def _plain_api_base(self) -> Deployment:
        # The HTTP client would refuse every call (or send the credentials in clear to
        # whoever reads the URL): one clear error at load instead of every job failing.
        try:
            url = URL(self.api_base)
            host = url.host
        except ValueError:
            raise ValueError("api_base: not a valid URL") from None
        if url.user is not None or url.password is not None:
            raise ValueError(
                "api_base: credentials in the URL are not allowed; "
                "put the key in api_key_env or api_key_file"
            )
        if not host:
            raise ValueError("api_base: no host")
        # A path parameter (`/v1;key=...`) or an `@` after the host carries credentials just
        # as well, and ends in access logs and error texts that quote the URL.
        if ";" in self.api_base or "@" in self.api_base:
            raise ValueError(
                "api_base: ';' and '@' are not allowed (they carry credentials); "
                "put the key in api_key_env or api_key_file"
            )
        if url.query_string or url.fragment:
            raise ValueError("api_base: a query or fragment is not allowed (the path is appended)")
        return self

    @model_validator(mode="after")
    def _key_required(self) -> Deployment:
        if self.api_key_env is not None and self.api_key_file is not None:
            raise ValueError("api_key_file: set api_key_env or api_key_file, not both")
        if (
            self.api_key_env is None
            and self.api_key_file is None
            and self.provider != "openai_compatible"
        ):
            raise ValueError(
                f"api_key_env: required for provider {self.provider} (or api_key_file)"
            )
        return self


class ModelEntry(_Strict):
    """What an alias means: its deployments, how to choose among them, then the fallbacks."""

    deployments: list[Deployment] = Field(min_length=1)
    routing: Routing = "ordered"
    """``ordered``: the first healthy one; ``weighted``: drawn by weight; ``least_in_flight``:
    the one with the fewest calls running (per weight), ties drawn by weight."""
    fallbacks: list[str] = Field(default_factory=list)
    context_fallbacks: list[str] = Field(default_factory=list)
    """Aliases with a larger context window: a context-length error goes straight to them."""
    content_policy_fallbacks: list[str] = Field(default_factory=list)
    """Aliases tried when the provider refuses the content (otherwise the job fails)."""
    unsupported_params: UnsupportedParams | None = None
    """Overrides the catalog's ``unsupported_params`` for this alias's deployments."""


class Catalog(_Strict):
    """Every alias a job may name. Build it with ``load_catalog``; it is immutable."""

    models: dict[str, ModelEntry] = Field(min_length=1)
    resilience: Resilience = Resilience()
    unsupported_params: UnsupportedParams = "refuse"
    """What a deployment does with a job parameter its provider cannot take as asked:
    ``refuse`` (the job moves on, and fails ``invalid_request`` naming it when no deployment
    takes it) or ``drop`` (sent without it, listed on the result). A team's setting overrides
    an alias's, which overrides this; a job's own overrides them all (docs/providers.md)."""

    _chains: dict[str, tuple[str, ...]] = PrivateAttr(default_factory=dict)
    """Each alias's ``chain`` without an override, made once: a job asks for its chain
    six times (its checks, its estimate, its first call, its calls)."""

    @property
    def deployment_names(self) -> list[str]:
        """Every deployment's name, in catalog order."""
        return [d.name for entry in self.models.values() for d in entry.deployments]

    def retry(self, deployment: Deployment) -> RetryPolicy:
        return deployment.retry or self.resilience.retry

    def breaker(self, deployment: Deployment) -> BreakerPolicy:
        return deployment.breaker or self.resilience.breaker

    @model_validator(mode="after")
    def _consistent(self) -> Catalog:
        seen: set[str] = set()
        for alias, entry in self.models.items():
            for i, deployment in enumerate(entry.deployments):
                if deployment.name in seen:
                    raise ValueError(
                        f"models.{alias}.deployments.{i}.name: duplicate deployment name "
                        f"{deployment.name!r}"
                    )
                seen.add(deployment.name)
            for field in ("fallbacks", "context_fallbacks", "content_policy_fallbacks"):
                for fallback in getattr(entry, field):
                    if fallback not in self.models:
                        raise ValueError(f"models.{alias}.{field}: unknown alias {fallback!r}")
        _refuse_cycles(self.models)
        self._chains = {
            alias: tuple(self._expand([alias], list(entry.fallbacks)))
            for alias, entry in self.models.items()
        }
        return self

    def resolve(self, alias: str) -> ModelEntry:
        """The entry of ``alias``; raises UnknownModel."""
        entry = self.models.get(alias)
        if entry is None:
            raise UnknownModel(f"unknown model {alias!r}")
        return entry

    def caps_stop(self, alias: str) -> bool:
        """Whether a job for ``alias`` may carry no more than OpenAI's ``MAX_STOP`` stop
        sequences: OpenAI itself serves it. Anthropic takes more (an Anthropic-format job's
        ``stop_sequences`` are its ``stop``), and an OpenAI-compatible server judges its own."""
        return any(d.provider == "openai" for d in self.resolve(alias).deployments)

    def takes_own_params(self, alias: str) -> bool:
        """Whether an ``openai_compatible`` deployment may serve a job for ``alias`` (its own
        or a fallback's): such a server takes parameters of its own, which OpenAI's API does
        not have."""
        return any(
            deployment.provider == "openai_compatible"
            for served in self.chain(alias)
            for deployment in self.resolve(served).deployments
        )

    def chain(self, alias: str, override: list[str] | None = None) -> list[str]:
        """The aliases to try, in order: ``alias``, its fallbacks, then theirs, without repeats.

        ``override`` (a job's own fallbacks) replaces the fallbacks of ``alias`` only; the
        aliases it names keep their catalog fallbacks. Breadth first, so the aliases a model
        names itself come before the ones their own fallbacks add. Raises UnknownModel naming
        the first alias the catalog does not have.
        """
        if override is None:
            # From pydantic's store itself: ``self._chains`` is looked up through
            # BaseModel.__getattr__ once the instance's own lookup failed, 12 µs a read.
            private: dict[str, Any] = self.__pydantic_private__  # type: ignore[assignment]
            made = private["_chains"].get(alias)
            if made is not None:
                return list(made)
        entry = self.resolve(alias)
        return self._expand([alias], list(entry.fallbacks if override is None else override))

    def redirect(self, aliases: list[str], tried: list[str]) -> list[str]:
        """``aliases`` and their fallbacks, breadth first, leaving out the ``tried`` ones: where
        a job goes when a failure names its own fallbacks (context length, content policy)."""
        return self._expand(tried, list(aliases))[len(tried) :]

    def _expand(self, chain: list[str], queue: list[str]) -> list[str]:
        chain = list(chain)
        while queue:
            candidate = queue.pop(0)
            if candidate not in chain:
                chain.append(candidate)
                queue.extend(self.resolve(candidate).fallbacks)
        return chain


def _refuse_cycles(models: Mapping[str, ModelEntry]) -> None:
    """Depth first; an alias met again on the current path closes a cycle."""
    done: set[str] = set()

    def visit(alias: str, path: tuple[str, ...]) -> None:
        if alias in path:
            loop = " -> ".join((*path[path.index(alias) :], alias))
            raise ValueError(f"models.{path[-1]}.fallbacks: fallback cycle {loop}")
        if alias not in done:
            for fallback in models[alias].fallbacks:
                visit(fallback, (*path, alias))
            done.add(alias)

    for alias in models:
        visit(alias, ())


def load_catalog(path: Path | None, env: Mapping[str, str]) -> Catalog:
    """Read, interpolate and validate a catalog; ``None`` loads the bundled mock catalog.

    Raises ConfigError with one line naming the file and the field.
    """
    if path is None:
        source = "router/catalogs/mock.yaml"
        text = resources.files("router").joinpath("catalogs/mock.yaml").read_text("utf-8")
    else:
        source = clipped_path(path)  # repeated by every message
        try:
            text = path.read_text("utf-8")
        except OSError as exc:
            raise ConfigError(
                f"{source}: cannot read the catalog ({exc.strerror}): give the path of a "
                "catalog YAML (--catalog or QUEUEGATE_CATALOG)"
            ) from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{source}: invalid YAML{where}") from exc
    if not isinstance(raw, dict):
        # Any text file is YAML of some kind: /etc/passwd is one string.
        raise ConfigError(
            f"{source}: not a catalog (a YAML mapping with models: at its top): give the path "
            "of a catalog YAML (--catalog or QUEUEGATE_CATALOG)"
        )
    try:
        return Catalog.model_validate(_interpolate(raw, env, source, ""))
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(exc)}") from None


def _interpolate(value: Any, env: Mapping[str, str], source: str, where: str) -> Any:
    if isinstance(value, dict):
        return {
            k: _interpolate(v, env, source, f"{where}.{k}".lstrip(".")) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_interpolate(v, env, source, f"{where}.{i}") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if default is not None:  # like the shell's ${VAR:-default}: unset or empty
            return env.get(name) or default
        if name not in env:
            raise ConfigError(f"{source}: {where}: environment variable {name} is not set")
        return env[name]

    return _VARIABLE.sub(substitute, value)


def _describe(exc: ValidationError) -> str:
    """One line per pydantic error, joined; input values are left out (they may be secrets)."""
    parts = []
    for error in exc.errors(include_input=False, include_url=False):
        field = ".".join(str(part) for part in error["loc"])
        cause = error.get("ctx", {}).get("error")
        # Our own catalog-wide checks name their field in the message (their location is empty).
        message = str(cause) if cause is not None else error["msg"]
        parts.append(f"{field}: {message}" if field else message)
    return "; ".join(parts)
