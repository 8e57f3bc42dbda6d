"""One trace, end to end: client -> gateway -> replica process -> storage.

A real gateway (in this process) and its replica process export over real
OTLP/HTTP to ``OtlpReceiver`` on 127.0.0.1, configured the way a user does
it: ``tracing: {exporter: otlp, endpoint: ...}`` in the app config, which the
gateway applies to itself and hands to its replicas through
``ReplicaSpec.tracing``. The deployment loads real torch files through
muxgate.backends, so a model load fetches from storage.

Requests, each with a client ``traceparent`` of its own trace:

1. model 1: a load. Expected, all in the client's trace::

       (client span)
       └── POST /                    SERVER span, gateway
           └── muxgate.route         gateway: model, replica, spillover
               └── muxgate.replica.handle        replica process
                   └── muxgate.model.load        replica process
                       └── muxgate.storage.fetch replica process

2. model 2: a second load (the cache holds two).
3. model 3: evicts model 1 (least recently used): ``muxgate.model.unload``
   with ``muxgate.unload_reason = "lru"`` in request 3's trace.

Leaving the gateway stops the replica, which unloads model 2 and 3 with
reason ``shutdown`` and flushes its spans as it exits; the gateway flushes
its own at shutdown, so every span is in the receiver when the block ends.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from gateway_harness import MODEL, observed_gateway
from otlp_receiver import OtlpReceiver, ReceivedSpan

SPAN_KIND_SERVER = 2

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


def new_traceparent() -> tuple[str, str, str]:
    trace_id, span_id = os.urandom(16).hex(), os.urandom(8).hex()
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def in_trace(spans: list[ReceivedSpan], trace_id: str) -> dict[str, list[ReceivedSpan]]:
    by_name: dict[str, list[ReceivedSpan]] = {}
    for span in spans:
        if span.trace_id == trace_id:
            by_name.setdefault(span.name, []).append(span)
    return by_name


def one(by_name: dict[str, list[ReceivedSpan]], name: str) -> ReceivedSpan:
    found = by_name.get(name, [])
    assert len(found) == 1, f"expected one {name!r} span, got {len(found)}: {sorted(by_name)}"
    return found[0]


async def test_a_model_load_is_one_trace_across_gateway_replica_and_storage(
    tmp_path: Path,
) -> None:
    traces = [new_traceparent() for _ in range(3)]
    with OtlpReceiver() as receiver:
        tracing = {"exporter": "otlp", "endpoint": receiver.endpoint}
        async with (
            observed_gateway(tmp_path, ["1", "2", "3"], tracing=tracing) as gateway,
            httpx.AsyncClient(base_url=gateway.url, timeout=30) as client,
        ):
            replica_ids = set()
            for model_id, (traceparent, _, _) in zip(["1", "2", "3"], traces, strict=True):
                r = await client.post("/", headers={MODEL: model_id, "traceparent": traceparent})
                assert r.status_code == 200, r.text
                replica_ids.add(r.headers["x-muxgate-replica"])
        (replica_id,) = replica_ids
        # Both sides flushed at shutdown; wait only for the uploads to land.
        spans = receiver.wait_for(
            lambda spans: (
                sum(s.name == "muxgate.model.unload" for s in spans) == 3
                and sum(s.name == "muxgate.route" for s in spans) == 3
            ),
            timeout=10,
        )

    # -- request 1: the whole chain, in the client's trace ---------------------
    _, trace_id, client_span_id = traces[0]
    chain = in_trace(spans, trace_id)
    server = one(chain, "POST /")
    route = one(chain, "muxgate.route")
    handle = one(chain, "muxgate.replica.handle")
    load = one(chain, "muxgate.model.load")
    fetch = one(chain, "muxgate.storage.fetch")

    assert server.kind == SPAN_KIND_SERVER
    assert server.parent_span_id == client_span_id
    assert route.parent_span_id == server.span_id
    assert handle.parent_span_id == route.span_id
    assert load.parent_span_id == handle.span_id
    assert fetch.parent_span_id == load.span_id

    # Who exported what: the gateway its two spans, the replica the rest.
    assert server.service_name == route.service_name == "muxgate-gateway"
    assert handle.service_name == load.service_name == fetch.service_name == "muxgate-replica"

    assert server.attributes["muxgate.deployment"] == "Observed"
    assert server.attributes["http.response.status_code"] == 200
    expected = {
        "muxgate.model_id": "1",
        "muxgate.replica_id": replica_id,
        "muxgate.deployment": "Observed",
    }
    assert expected.items() <= route.attributes.items()
    assert route.attributes["muxgate.spillover"] is False
    assert expected.items() <= handle.attributes.items()
    assert expected.items() <= load.attributes.items()
    assert fetch.attributes["url.full"] == (tmp_path / "1" / "model.pt").as_uri()
    assert fetch.attributes["muxgate.bytes"] == (tmp_path / "1" / "model.pt").stat().st_size
    # what the load read, on the load span itself
    assert load.attributes["muxgate.bytes"] == fetch.attributes["muxgate.bytes"]
    assert load.attributes["muxgate.source_url"] == fetch.attributes["url.full"]
    # the CPU the loader's own code took (a small state dict: well under a second)
    assert 0 < load.attributes["muxgate.load.cpu_seconds"] < 1
    assert "muxgate.model.unload" not in chain

    # -- request 2: a load, nothing evicted ------------------------------------
    second = in_trace(spans, traces[1][1])
    assert one(second, "muxgate.model.load").attributes["muxgate.model_id"] == "2"
    assert "muxgate.model.unload" not in second

    # -- request 3: model 1 evicted (lru) before model 3 loads -----------------
    third = in_trace(spans, traces[2][1])
    unload = one(third, "muxgate.model.unload")
    assert unload.parent_span_id == one(third, "muxgate.replica.handle").span_id
    assert unload.attributes == {
        "muxgate.model_id": "1",
        "muxgate.replica_id": replica_id,
        "muxgate.deployment": "Observed",
        "muxgate.bytes": fetch.attributes["muxgate.bytes"],
        "muxgate.source_url": fetch.attributes["url.full"],
        "muxgate.unload_reason": "lru",
    }
    assert one(third, "muxgate.model.load").attributes["muxgate.model_id"] == "3"

    # -- shutdown: the models still cached are unloaded with reason shutdown ----
    at_shutdown = sorted(
        s.attributes["muxgate.model_id"]
        for s in spans
        if s.name == "muxgate.model.unload"
        and s.attributes.get("muxgate.unload_reason") == "shutdown"
    )
    assert at_shutdown == ["2", "3"]


async def test_otel_environment_alone_turns_tracing_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    traceparent, trace_id, _ = new_traceparent()
    with OtlpReceiver() as receiver:
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        async with (
            observed_gateway(tmp_path, ["1"]) as gateway,
            httpx.AsyncClient(base_url=gateway.url, timeout=30) as client,
        ):
            r = await client.post("/", headers={MODEL: "1", "traceparent": traceparent})
            assert r.status_code == 200
        # Everything is flushed by now (both sides shut down): a short wait suffices.
        spans = receiver.wait_for(
            lambda spans: (
                {"muxgate.route", "muxgate.model.load"}
                <= {s.name for s in spans if s.trace_id == trace_id}
            ),
            timeout=1.5,
        )
    assert spans
