"""OpenTelemetry traces of each job, across the broker: the ground every component calls.

Off unless switched on, and then free: every call site reads ``tracing.ON`` (one module
attribute) and does nothing else when it is False; nothing here imports OpenTelemetry until
tracing is switched on. Switched on in a process by:

- ``start(service)``, which every long-running role and ``GatewayClient`` call: on when the
  environment asks for traces (``OTEL_TRACES_EXPORTER`` naming ``otlp`` or ``console``, or,
  with that unset, ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``
  set) and ``OTEL_SDK_DISABLED`` is not ``true``; or when the application has already set
  an SDK tracer provider of its own, which is then used as it is. The SDK reads the rest of
  the standard variables itself (``OTEL_SERVICE_NAME``, ``OTEL_TRACES_SAMPLER`` and its
  argument, ``OTEL_BSP_*``, ``OTEL_EXPORTER_OTLP_HEADERS``, …).
- ``install(provider)``: a provider given in code (tests, an application's own set-up).

The context travels as W3C ``traceparent`` / ``tracestate`` in AMQP headers (``inject``,
``extract``). ``CONTENT``: prompts and answers may go into spans, for teams whose capture
policy is ``full`` (``QUEUEGATE_TRACE_CONTENT``); never otherwise.

Who decides what is sampled, and which trace a job is in: the gateway, never a tenant. A
context that arrives from a caller (an HTTP caller's ``traceparent``, a job a tenant
published to the broker) is not a parent: the gateway's span starts a trace of its own, its
id drawn here, and carries the caller's context as a link (``caller``), its ``tracestate``
cut to ``TRACESTATE_MEMBERS`` members and ``TRACESTATE_BYTES``. The operator's sampler
(``OTEL_TRACES_SAMPLER``) decides on that new root, so a tenant can neither choose trace ids
its ratio always keeps nor put its spans and usage rows into another team's trace. Inside
the gateway the trace goes on: a worker continues the context of a job the front door
published (``trusted``), accounting the worker's. ``heed_callers``
(``QUEUEGATE_TRACE_HEED_CALLERS``) makes every caller's context the parent again, its sampled
flag heeded, for a deployment whose every caller is trusted.

At exit the spans still buffered are exported for at most ``FLUSH_AT_EXIT`` seconds
(``OTEL_BSP_EXPORT_TIMEOUT`` when set): a collector that is down must not hold a stopping
process for the SDK's 30 s.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from queuegate.errors import ConfigError, GatewayError

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import Sampler
    from opentelemetry.trace import Link, Span, SpanKind, Tracer
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    from opentelemetry.util.types import AttributeValue

log = logging.getLogger(__name__)

T = TypeVar("T")

ON = False
"""Whether this process traces; read at every call site, before anything else is done."""
CONTENT = False
"""Whether prompts and answers of teams capturing ``full`` content go into spans."""

INSTRUMENTATION = "queuegate"
HEADERS = ("traceparent", "tracestate")
"""The W3C trace context headers carried by a job's AMQP message."""
EXPORTERS = frozenset({"otlp", "console", "none"})
PROTOCOL = "http/protobuf"
"""The one OTLP protocol exported (``queuegate[otel]`` installs its exporter)."""
TRACESTATE_MEMBERS = 32
"""Members of a caller's ``tracestate`` kept at most (the W3C limit)..."""
TRACESTATE_BYTES = 512
"""... and bytes: the members after that are dropped whole, not cut (the W3C advice)."""
FLUSH_AT_EXIT = 5.0
"""Seconds a process exiting gives its buffered spans to reach the collector, unless
``OTEL_BSP_EXPORT_TIMEOUT`` (milliseconds) says otherwise; the rest are dropped."""


@dataclass
class _State:
    tracer: Tracer | None = None
    propagator: TraceContextTextMapPropagator | None = None
    kinds: dict[str, SpanKind] = field(default_factory=dict)
    use: Callable[[Span], object] | None = None
    """Make a span current in this task; returns the token ``release`` takes."""
    release: Callable[[object], None] | None = None
    decided: bool = False
    """``start`` has run (or ``install``): later starts change nothing."""
    provider: TracerProvider | None = None
    """The provider ``start`` made, shut down when another is installed."""
    heed: bool = False
    """A caller's context is the parent of the gateway's spans (``heed_callers``)."""


_state = _State()


def start(service: str, *, content: bool = False, heed_callers: bool = False) -> None:
    """Trace this process if its environment (or its application) asks for it; once per
    process, later calls change nothing. ``service`` is the ``service.name`` when
    ``OTEL_SERVICE_NAME`` does not set one; ``heed_callers``: a context from outside the
    process decides by its sampled flag (see the module's docstring).

    Raises ConfigError for an ``OTEL_TRACES_EXPORTER`` or OTLP protocol it cannot export
    with. Without the OpenTelemetry packages it warns once and stays off."""
    if _state.decided:
        return
    exporters = wanted_exporters(os.environ)
    _state.decided = True
    _state.heed = heed_callers
    try:
        from opentelemetry import trace
        from opentelemetry.trace import ProxyTracerProvider
    except ImportError:
        _not_installed(exporters)
        return
    current = trace.get_tracer_provider()
    if not isinstance(current, ProxyTracerProvider | trace.NoOpTracerProvider):
        # The application set up OpenTelemetry itself: its provider, its exporters.
        _switch(current, content)
        return
    if not exporters:
        return
    try:
        # The API alone may be installed (other libraries need it); the SDK comes with the
        # extra.
        _state.provider = _provider_of(service, exporters)
    except ImportError:
        _not_installed(exporters)
        return
    _switch(_state.provider, content)


def _not_installed(exporters: list[str]) -> None:
    if exporters:
        log.warning(
            "traces are asked for by the environment (OTEL_*) but the OpenTelemetry SDK is"
            " not installed: none are exported; install it with pip install 'queuegate[otel]'"
        )


def install(provider: Any, *, content: bool = False, heed_callers: bool = False) -> None:
    """Trace with ``provider`` (an OpenTelemetry ``TracerProvider``) from now on, whatever
    ``start`` decided; None switches tracing off (and shuts down one ``start`` made), and
    the next ``start`` decides again."""
    if _state.provider is not None and _state.provider is not provider:
        _state.provider.shutdown()
        _state.provider = None
    _state.decided = provider is not None
    _state.heed = heed_callers
    _switch(provider, content)


def _switch(provider: Any, content: bool) -> None:
    """Trace with ``provider`` from now on; None: no more."""
    # Module globals rather than state: every call site reads ``tracing.ON``, the cheapest
    # check there is, and must see the change.
    global ON, CONTENT  # noqa: PLW0603
    if provider is None:
        _state.tracer = _state.propagator = _state.use = _state.release = None
        ON = CONTENT = False
        return
    from importlib.metadata import PackageNotFoundError, version

    from opentelemetry import context, trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    try:
        ours = version("queuegate")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree not installed
        ours = None
    _state.tracer = provider.get_tracer(INSTRUMENTATION, ours)
    _state.propagator = TraceContextTextMapPropagator()
    _state.kinds = {kind.name: kind for kind in trace.SpanKind}
    _state.use = lambda span: context.attach(trace.set_span_in_context(span))
    _state.release = context.detach  # type: ignore[assignment]
    ON, CONTENT = True, content


def wanted_exporters(env: Mapping[str, str]) -> list[str]:
    """The span exporters the environment asks for; empty when tracing stays off."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    named = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if named:
        exporters = [name.strip() for name in named.split(",") if name.strip()]
        unknown = sorted(set(exporters) - EXPORTERS)
        if unknown:
            raise ConfigError(
                f"OTEL_TRACES_EXPORTER names {', '.join(unknown)}: queuegate exports traces "
                "with otlp (OTLP over HTTP) or console, or none"
            )
        exporters = [name for name in exporters if name != "none"]
    elif env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        exporters = ["otlp"]
    else:
        return []
    if "otlp" in exporters:
        for variable in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
            protocol = env.get(variable, "").strip()
            if protocol:
                if protocol != PROTOCOL:
                    raise ConfigError(
                        f"{variable}={protocol}: queuegate exports OTLP over HTTP only; "
                        f"set {PROTOCOL} (port 4318 on a collector) or unset it"
                    )
                break
    return exporters


def _provider_of(service: str, exporters: list[str]) -> TracerProvider:
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service}))
    # The SDK's exit handler would wait up to 30 s for a collector that is down.
    provider = TracerProvider(resource=resource, sampler=operator_sampler(), shutdown_on_exit=False)
    atexit.register(shut_down, provider, flush_at_exit(os.environ))
    for name in exporters:
        if name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def operator_sampler() -> Sampler:
    """The sampler of ``OTEL_TRACES_SAMPLER`` (parent-based, always on, by default): it sees
    a caller's context as a parent only with ``heed_callers`` (see ``caller``)."""
    from opentelemetry.sdk.trace import TracerProvider

    # The SDK's own reading of the standard variables, so they mean what they always mean.
    return TracerProvider(shutdown_on_exit=False).sampler


def flush_at_exit(env: Mapping[str, str]) -> float:
    """Seconds an exiting process exports its buffered spans for (``FLUSH_AT_EXIT``)."""
    named = env.get("OTEL_BSP_EXPORT_TIMEOUT", "").strip()
    try:
        return max(0.0, float(named) / 1000) if named else FLUSH_AT_EXIT
    except ValueError:
        raise ConfigError(
            f"OTEL_BSP_EXPORT_TIMEOUT={named}: give milliseconds (e.g. 5000) or unset it"
        ) from None


def shut_down(provider: TracerProvider, within: float) -> None:
    """Shut ``provider`` down, exporting what it holds, for at most ``within`` seconds: the
    SDK bounds none of it below 30 s, so it runs in a thread of its own, left behind (a
    daemon, as the exporters' are) when the collector does not answer in time."""
    stopping = threading.Thread(target=provider.shutdown, name="otel-shutdown", daemon=True)
    stopping.start()
    stopping.join(within)
    if stopping.is_alive():
        log.warning(
            "spans not exported within %.0f s of stopping (is the collector down?): the rest"
            " are dropped; OTEL_BSP_EXPORT_TIMEOUT sets the wait",
            within,
        )


# Spans: each called only once ``ON`` was checked.


class _Current:
    """``span``'s context manager: the span current in this task until the block ends, then
    ended. A class rather than the SDK's generator-based ``start_as_current_span``: that
    costs about a third more per span, and the worker makes several per job."""

    __slots__ = ("span", "token")

    def __init__(self, span: Span) -> None:
        self.span = span
        self.token: object = None

    def __enter__(self) -> Span:
        assert _state.use is not None
        self.token = _state.use(self.span)
        return self.span

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert _state.release is not None
        if isinstance(exc, Exception):
            failed(self.span, exc)
        _state.release(self.token)
        self.span.end()


def span(
    name: str,
    *,
    kind: str = "INTERNAL",
    attributes: Mapping[str, AttributeValue] | None = None,
    parent: Context | None = None,
    links: Sequence[Link] | None = None,
    start_ns: int | None = None,
) -> _Current:
    """A span, current while the ``with`` block runs; ``kind`` is a SpanKind's name. An
    exception leaving the block marks it failed (``failed``)."""
    assert _state.tracer is not None
    return _Current(
        _state.tracer.start_span(
            name,
            context=parent,
            kind=_state.kinds[kind],
            attributes=attributes,
            links=links,
            start_time=start_ns,
            record_exception=False,
            set_status_on_exception=False,
        )
    )


async def traced(
    work: Awaitable[T],
    name: str,
    *,
    kind: str = "INTERNAL",
    attributes: Mapping[str, AttributeValue] | None = None,
) -> T:
    """``await work`` in a span of its own."""
    with span(name, kind=kind, attributes=attributes):
        return await work


def record(
    name: str,
    start_ns: int,
    end_ns: int,
    *,
    kind: str = "INTERNAL",
    parent: Context | None = None,
    attributes: Mapping[str, AttributeValue] | None = None,
) -> None:
    """A span that has already happened, from ``start_ns`` to ``end_ns`` (epoch ns)."""
    assert _state.tracer is not None
    done = _state.tracer.start_span(
        name, context=parent, kind=_state.kinds[kind], attributes=attributes, start_time=start_ns
    )
    done.end(end_time=max(start_ns, end_ns))


def failed(target: Span, exc: BaseException) -> None:
    """Mark ``target`` failed by ``exc``: ``error.type`` is a job's error code or a provider
    call's error class, else the exception's type. Only our own errors' messages are kept:
    they are written to be shown (keys scrubbed, URLs without passwords), and only where
    content may be traced: a provider's error text can repeat the prompt."""
    kind = getattr(exc, "code", None) or getattr(exc, "error_class", None)
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        target.set_attribute("http.response.status_code", status)
    kind = str(kind or type(exc).__qualname__)
    errored(target, kind, str(exc) if CONTENT and isinstance(exc, GatewayError) else kind)


def errored(target: Span, kind: str, said: str) -> None:
    """Mark ``target`` failed: ``error.type`` ``kind``, the status saying ``said``."""
    from opentelemetry.trace import Status, StatusCode

    target.set_attribute("error.type", kind)
    target.set_status(Status(StatusCode.ERROR, said))


def current() -> Span:
    from opentelemetry import trace

    return trace.get_current_span()


def event(name: str, attributes: Mapping[str, AttributeValue] | None = None) -> None:
    """An event on the current span (a stream's first chunk)."""
    current().add_event(name, attributes)


def ids() -> tuple[str, str | None] | None:
    """The current trace's id and, when its span is recorded (sampled), the span's id, in
    hex; None outside any trace."""
    context = current().get_span_context()
    if not context.is_valid:
        return None
    recorded = format(context.span_id, "016x") if context.trace_flags.sampled else None
    return format(context.trace_id, "032x"), recorded


# Propagation


def inject(headers: MutableMapping[str, Any]) -> None:
    """Put the current trace context into a message's headers (W3C trace context)."""
    assert _state.propagator is not None
    _state.propagator.inject(headers)


def extract(headers: Mapping[str, Any] | None) -> Context | None:
    """The trace context a message's headers carry; None when they carry none."""
    if not headers or "traceparent" not in headers:
        return None
    assert _state.propagator is not None
    carrier = {name: text for name in HEADERS if (text := _text(headers.get(name)))}
    if "tracestate" in carrier:
        carrier["tracestate"] = _bounded(carrier["tracestate"])
    return _state.propagator.extract(carrier)


def caller(
    headers: Mapping[str, Any] | None, *, trusted: bool = False
) -> tuple[Context | None, list[Link]]:
    """The parent and links of a span that takes over from a caller whose context
    ``headers`` carry: that context as the parent when ``trusted`` (the gateway's own, or
    with ``heed_callers``); otherwise a new root (an empty context) linked to it."""
    context = extract(headers)
    if trusted or _state.heed:
        return context, []
    from opentelemetry.context import Context
    from opentelemetry.trace import Link, get_current_span

    found = get_current_span(context).get_span_context() if context is not None else None
    return Context(), [Link(found)] if found is not None and found.is_valid else []


def _bounded(tracestate: str) -> str:
    """``tracestate`` cut to ``TRACESTATE_MEMBERS`` members and ``TRACESTATE_BYTES``, the
    members beyond dropped whole."""
    kept: list[str] = []
    size = 0
    for member in filter(None, (text.strip() for text in tracestate.split(","))):
        cost = len(member) + (1 if kept else 0)  # and its comma
        if len(kept) == TRACESTATE_MEMBERS or size + cost > TRACESTATE_BYTES:
            break
        kept.append(member)
        size += cost
    return ",".join(kept)


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode("ascii", errors="replace")
    return value if isinstance(value, str) else None


def continued(trace_id: str, span_id: str) -> Context | None:
    """A context whose parent is the sampled span ``span_id`` of trace ``trace_id`` (hex, as
    ``ids`` gives them), to continue it in another process; None when they are not ids."""
    from opentelemetry import trace

    try:
        parent = trace.SpanContext(
            int(trace_id, 16),
            int(span_id, 16),
            is_remote=True,
            trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
        )
    except ValueError:
        return None
    if not parent.is_valid:
        return None
    return trace.set_span_in_context(trace.NonRecordingSpan(parent))


# GenAI semantic conventions


PROVIDER_NAMES = {"openai": "openai", "anthropic": "anthropic", "openai_compatible": "openai"}
"""``gen_ai.provider.name`` of each provider kind: the API flavour spoken (an OpenAI-compatible
server speaks OpenAI's; ``server.address`` says which it is)."""


def response_attributes(response: Mapping[str, Any] | None) -> dict[str, AttributeValue]:
    """``gen_ai.response.*`` of an OpenAI ``chat.completion``: id, model, finish reasons."""
    if not response:
        return {}
    found: dict[str, AttributeValue] = {}
    if isinstance(response.get("id"), str):
        found["gen_ai.response.id"] = response["id"]
    if isinstance(response.get("model"), str):
        found["gen_ai.response.model"] = response["model"]
    choices = response.get("choices")
    if isinstance(choices, list):
        reasons = [
            str(choice.get("finish_reason"))
            for choice in choices
            if isinstance(choice, dict) and choice.get("finish_reason")
        ]
        if reasons:
            found["gen_ai.response.finish_reasons"] = reasons
    return found
