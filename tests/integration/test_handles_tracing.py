"""The gateway's HTTP server span, and traces across handle calls.

A gateway exporting to a real OTLP/HTTP receiver serves ``Down`` and ``Up``;
spans from the gateway (this process) and both replicas must form one trace:
incoming traceparent -> server span -> (route) -> replica span, and for
composition: Up's replica span -> handle call's server span -> Down's replica span,
and the same from ``SyncUp``'s plain ``def`` method (a worker thread).
"""

from __future__ import annotations

import httpx
import pytest
from gateway_harness import running_gateway
from opentelemetry import trace
from otlp_receiver import OtlpReceiver, ReceivedSpan

from muxgate.replicas._handle import aclose_handle_clients, get_deployment_handle

SERVER = 2  # OTLP SpanKind SPAN_KIND_SERVER

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


def _ancestors(span: ReceivedSpan, spans: list[ReceivedSpan]) -> list[str]:
    """Names of the span's ancestors, nearest first (within the received spans)."""
    by_id = {s.span_id: s for s in spans}
    names = []
    while span.parent_span_id and span.parent_span_id in by_id:
        span = by_id[span.parent_span_id]
        names.append(span.name)
    return names


async def test_server_span_and_traces_across_handles() -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent_id = "00f067aa0ba902b7"
    with OtlpReceiver() as receiver:
        config = {
            "http": {"port": 0},
            "tracing": {"exporter": "otlp", "endpoint": receiver.endpoint},
            "deployments": [
                {"name": "Down", "import_path": "handle_apps:Down", "route_prefix": "/down"},
                {"name": "Up", "import_path": "handle_apps:Up", "route_prefix": "/up"},
                {"name": "SyncUp", "import_path": "handle_apps:SyncUp", "route_prefix": "/sync"},
            ],
        }
        async with running_gateway(config) as gw:
            async with httpx.AsyncClient() as client:
                response = await client.post(
                    f"{gw.url}/down",
                    headers={
                        "serve_multiplexed_model_id": "7",
                        "traceparent": f"00-{trace_id}-{parent_id}-01",
                    },
                )
                assert response.status_code == 200
            # A handle call made under a span of the caller continues it.
            with trace.get_tracer("test").start_as_current_span("caller") as caller:
                caller_trace = format(caller.get_span_context().trace_id, "032x")
                up = get_deployment_handle("Up", gw.url).options(multiplexed_model_id="foo")
                assert (await up.compose.remote("bar"))["downstream"]["model_id"] == "bar"
            with trace.get_tracer("test").start_as_current_span("sync caller") as caller:
                sync_trace = format(caller.get_span_context().trace_id, "032x")
                sync_up = get_deployment_handle("SyncUp", gw.url)
                assert (await sync_up.compose.remote("baz"))["downstream"]["model_id"] == "baz"
            await aclose_handle_clients()
        # Leaving the gateway shut its tracing down (flushed) and stopped the
        # replicas, which flush theirs as they exit.
        spans = receiver.wait_for(
            lambda spans: sum(s.name == "muxgate.replica.handle" for s in spans) >= 6
        )

    http_span = next(s for s in spans if s.name == "POST /down")
    assert http_span.kind == SERVER
    assert (http_span.trace_id, http_span.parent_span_id) == (trace_id, parent_id)
    attrs = http_span.attributes
    assert attrs["http.request.method"] == "POST"
    assert attrs["url.path"] == "/down"
    assert attrs["http.response.status_code"] == 200
    assert attrs["muxgate.deployment"] == "Down"
    assert attrs["muxgate.model_id"] == "7"
    assert attrs["muxgate.replica_id"] == response.headers["x-muxgate-replica"]
    replica_span = next(
        s for s in spans if s.name == "muxgate.replica.handle" and s.trace_id == trace_id
    )
    assert "POST /down" in _ancestors(replica_span, spans)

    # Composition: caller -> handle server span (Up) -> Up's replica span ->
    # handle server span (Down) -> Down's replica span, all one trace; the
    # same when Up's method is sync (its call leaves from a worker thread).
    for trace_id, top in ((caller_trace, "caller"), (sync_trace, "sync caller")):
        in_trace = [s for s in spans if s.trace_id == trace_id]
        down_calls = [
            s
            for s in in_trace
            if s.name == "muxgate.replica.handle"
            and s.attributes.get("muxgate.deployment") == "Down"
        ]
        assert down_calls, sorted(s.name for s in in_trace)
        chain = _ancestors(down_calls[0], in_trace)
        handle_spans = [n for n in chain if n == "POST /-/handles/{deployment}/{method}"]
        assert len(handle_spans) == 2, chain
        assert "muxgate.replica.handle" in chain
        assert chain[-1] == top
