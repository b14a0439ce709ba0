"""A trace receiver on loopback: OTLP over HTTP (``POST /v1/traces``, protobuf), as a
collector takes it, keeping the spans it decodes (or only counting them).

    async with OtlpSink() as sink:            # env: OTEL_EXPORTER_OTLP_ENDPOINT=sink.url
        ...
        [job] = await sink.wait_for(lambda s: s.name == "chat gpt-4o-mini")
"""

from __future__ import annotations

import asyncio
import gzip
import socket
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

PROTOBUF = "application/x-protobuf"


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    kind: int
    """The OTLP kind: 1 internal, 2 server, 3 client, 4 producer, 5 consumer."""
    trace_id: str
    span_id: str
    parent_id: str
    """Empty for a root span."""
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    events: tuple[str, ...]
    status: int
    """The OTLP status code: 0 unset, 1 ok, 2 error."""


class OtlpSink:
    """``keep=False`` only counts the spans (``received``), for load that must not fill
    memory; the receiver's own decoding is then its only cost."""

    def __init__(self, *, keep: bool = True) -> None:
        self.keep = keep
        self.spans: list[ReceivedSpan] = []
        self.received = 0
        self.requests = 0
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> Self:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/traces", self._export)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))  # any free port
        await web.SockSite(self._runner, sock).start()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def wait_for(
        self, predicate: Callable[[ReceivedSpan], bool], count: int = 1, timeout: float = 30
    ) -> list[ReceivedSpan]:
        """The first ``count`` spans kept that match, once that many have arrived."""

        def found() -> list[ReceivedSpan]:
            return [span for span in self.spans if predicate(span)]

        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(found()) >= count)
        return found()[:count]

    async def _export(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        export = ExportTraceServiceRequest.FromString(body)
        spans = [
            _span(_service(resource.resource.attributes), span)
            for resource in export.resource_spans
            for scope in resource.scope_spans
            for span in scope.spans
        ]
        async with self._changed:
            self.requests += 1
            self.received += len(spans)
            if self.keep:
                self.spans += spans
            self._changed.notify_all()
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(), content_type=PROTOBUF
        )


def _service(attributes: Any) -> str:
    return str(_attributes(attributes).get("service.name", ""))


def _span(service: str, span: Any) -> ReceivedSpan:
    return ReceivedSpan(
        service=service,
        name=span.name,
        kind=span.kind,
        trace_id=span.trace_id.hex(),
        span_id=span.span_id.hex(),
        parent_id=span.parent_span_id.hex(),
        start_ns=span.start_time_unix_nano,
        end_ns=span.end_time_unix_nano,
        attributes=_attributes(span.attributes),
        events=tuple(event.name for event in span.events),
        status=span.status.code,
    )


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    if kind is None:
        return None
    return getattr(value, kind)
