"""A replica continues the caller's trace: its handling span, and the model
load it causes, join the trace named by the call's ``traceparent``, exported
over real OTLP/HTTP to a collector stand-in on 127.0.0.1."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from muxgate.gateway._connection import ReplicaConnection
from muxgate.gateway.launchers.local import LocalLauncher
from muxgate.replicas.contract import ReplicaSpec, TracingSettings

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

APP_DIR = str(Path(__file__).resolve().parents[1] / "apps")
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"


class _Collector(BaseHTTPRequestHandler):
    bodies: list[bytes]

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", "0"))
        self.server.bodies.append(self.rfile.read(length))  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[tuple[str, list[bytes]]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    server.bodies = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.bodies  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def spans(bodies: list[bytes]) -> list[Any]:
    found = []
    for body in bodies:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                found.extend(scope_spans.spans)
    return found


async def test_handle_and_load_spans_continue_the_callers_trace(
    collector: tuple[str, list[bytes]], tmp_path: Path
) -> None:
    endpoint, bodies = collector
    launcher = LocalLauncher()
    try:
        process = await launcher.start(
            ReplicaSpec(
                deployment="TorchModels",
                import_path="torch_models:TorchModels",
                replica_id="TorchModels#trace",
                init_kwargs={"events_path": str(tmp_path / "ev"), "state_dir": str(tmp_path)},
                app_dir=APP_DIR,
                listen="unix:",
                tracing=TracingSettings(exporter="otlp", endpoint=endpoint),
            )
        )
        async with await ReplicaConnection.connect(process.address) as conn:
            reply = await conn.call(
                request_id="traced",
                model_id="m1",
                method="predict",
                args=msgspec.msgpack.encode([[1.0, 2.0, 3.0, 4.0]]),
                traceparent=f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01",
            )
            assert reply.error is None, reply.error
        # The replica flushes its spans as it exits (connection closed).
        with anyio.fail_after(30):
            assert await process.wait() == 0
    finally:
        await launcher.aclose()

    by_name = {span.name: span for span in spans(bodies)}
    handle = by_name["muxgate.replica.handle"]
    assert handle.trace_id.hex() == TRACE_ID
    assert handle.parent_span_id.hex() == PARENT_SPAN_ID
    attributes = {a.key: a.value.string_value for a in handle.attributes}
    assert attributes["muxgate.model_id"] == "m1"
    assert attributes["muxgate.replica_id"] == "TorchModels#trace"
    # The load the request caused is part of the same trace, under the handling span.
    load = by_name["muxgate.model.load"]
    assert load.trace_id.hex() == TRACE_ID
    assert load.parent_span_id == handle.span_id
    # Unloaded at shutdown (the connection closed), also exported.
    assert "muxgate.model.unload" in by_name
