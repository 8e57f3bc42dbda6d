"""A real OTLP/HTTP trace receiver for tests.

Listens on 127.0.0.1 (ephemeral port), accepts ``POST /v1/traces`` with a
protobuf ``ExportTraceServiceRequest`` body (plain or gzip), and keeps every
span it decodes. Use it as a context manager::

    with OtlpReceiver() as receiver:
        configure_tracing("otlp", receiver.endpoint)
        ...
        span = receiver.wait_for_span("muxgate.route")
        assert span.attributes["muxgate.model_id"] == "1"

``receiver.endpoint`` is the base URL (``http://127.0.0.1:PORT``); set
``OTEL_EXPORTER_OTLP_ENDPOINT`` to it for a subprocess. ``wait_for*`` wait on
a condition with a deadline (no sleeps); remember the exporter batches, so
flush (``flush_tracing()``) or shut down the sender first to be quick.
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

__all__ = ["OtlpReceiver", "ReceivedSpan"]


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as the receiver decoded it; ids are lower-case hex."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str | None
    kind: int
    attributes: dict[str, Any]
    resource: dict[str, Any]
    scope: str
    status_code: int
    events: list[str] = field(default_factory=list)

    @property
    def service_name(self) -> str | None:
        value = self.resource.get("service.name")
        return value if isinstance(value, str) else None


def _value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, which)


def _attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


def decode_spans(body: bytes) -> list[ReceivedSpan]:
    """Spans of one ``ExportTraceServiceRequest`` protobuf body."""
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    return [
        ReceivedSpan(
            name=span.name,
            trace_id=span.trace_id.hex(),
            span_id=span.span_id.hex(),
            parent_span_id=span.parent_span_id.hex() or None,
            kind=span.kind,
            attributes=_attrs(span.attributes),
            resource=_attrs(resource_spans.resource.attributes),
            scope=scope_spans.scope.name,
            status_code=span.status.code,
            events=[event.name for event in span.events],
        )
        for resource_spans in request.resource_spans
        for scope_spans in resource_spans.scope_spans
        for span in scope_spans.spans
    ]


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        if self.path != "/v1/traces":
            self._answer(404, b"")
            return
        if (self.headers.get("Content-Type") or "").split(";")[0] != "application/x-protobuf":
            self._answer(415, b"")
            return
        encoding = (self.headers.get("Content-Encoding") or "").lower()
        try:
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            spans = decode_spans(body)
        except Exception:  # malformed upload: a 400, as a collector answers
            self._answer(400, b"")
            return
        self.server.receiver._add(spans)
        self._answer(200, ExportTraceServiceResponse().SerializeToString())

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    receiver: OtlpReceiver


class OtlpReceiver:
    """OTLP/HTTP traces endpoint on 127.0.0.1; collects ``ReceivedSpan``s."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._spans: list[ReceivedSpan] = []
        self.requests = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        """Base URL (``http://127.0.0.1:PORT``), without ``/v1/traces``."""
        assert self._server is not None, "receiver not started"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def traces_url(self) -> str:
        return self.endpoint + "/v1/traces"

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._cond:
            return list(self._spans)

    def clear(self) -> None:
        with self._cond:
            self._spans.clear()

    def _add(self, spans: list[ReceivedSpan]) -> None:
        with self._cond:
            self._spans.extend(spans)
            self.requests += 1
            self._cond.notify_all()

    def wait_for(
        self, predicate: Callable[[list[ReceivedSpan]], bool], timeout: float = 10.0
    ) -> list[ReceivedSpan]:
        """Wait until ``predicate(all spans so far)`` holds; return the spans."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self._spans):
                left = deadline - time.monotonic()
                if left <= 0:
                    names = sorted({s.name for s in self._spans})
                    raise TimeoutError(f"spans never matched; received {names}")
                self._cond.wait(left)
            return list(self._spans)

    def wait_for_span(self, name: str, timeout: float = 10.0, **attributes: Any) -> ReceivedSpan:
        """Wait for a span called ``name`` (whose attributes include ``attributes``)."""

        def match(span: ReceivedSpan) -> bool:
            return span.name == name and all(
                span.attributes.get(k) == v for k, v in attributes.items()
            )

        spans = self.wait_for(lambda spans: any(match(s) for s in spans), timeout)
        return next(s for s in spans if match(s))

    def start(self) -> OtlpReceiver:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.receiver = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self._server = self._thread = None

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.endpoint if self._server is not None else "stopped"
        return f"OtlpReceiver({where}, spans={len(self.spans)}, requests={self.requests})"
