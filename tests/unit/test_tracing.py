"""Tracing set-up, exported to a real OTLP/HTTP receiver on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from otlp_receiver import OtlpReceiver, ReceivedSpan

from muxgate.replicas._propagation import extract_context, inject_traceparent
from muxgate.replicas._tracing import (
    TracingError,
    configure_tracing,
    exports_spans,
    flush_tracing,
    shutdown_tracing,
    tracing_active,
)

OTEL_VARS = (
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_TRACES_SAMPLER",
    "OTEL_PROPAGATORS",
)


@pytest.fixture(autouse=True)
def clean_tracing(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in OTEL_VARS:
        monkeypatch.delenv(name, raising=False)
    yield
    shutdown_tracing()


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r
        shutdown_tracing()  # flush into the receiver while it still listens


tracer = trace.get_tracer("muxgate.tests")  # at import time, before any set-up


def by_name(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
    return {s.name: s for s in spans}


def test_spans_reach_an_otlp_receiver_with_parents_and_attributes(
    receiver: OtlpReceiver,
) -> None:
    configure_tracing(
        "otlp",
        receiver.endpoint,
        service_name="muxgate-test",
        resource_attributes={"muxgate.deployment": "Model"},
    )
    assert tracing_active()
    with (
        tracer.start_as_current_span("outer", attributes={"muxgate.model_id": "7"}) as outer,
        tracer.start_as_current_span("inner") as inner,
    ):
        inner.set_attribute("muxgate.spillover", True)
    assert flush_tracing()
    spans = by_name(receiver.wait_for(lambda s: len(s) >= 2))
    assert set(spans) == {"outer", "inner"}
    o, i = spans["outer"], spans["inner"]
    assert o.parent_span_id is None
    assert i.parent_span_id == o.span_id
    assert i.trace_id == o.trace_id == format(outer.get_span_context().trace_id, "032x")
    assert o.attributes == {"muxgate.model_id": "7"}
    assert i.attributes == {"muxgate.spillover": True}
    assert o.service_name == "muxgate-test"
    assert o.resource["muxgate.deployment"] == "Model"
    assert o.scope == "muxgate.tests"


def test_otel_environment_is_read_at_call_time(
    receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
    configure_tracing()
    with tracer.start_as_current_span("env-span"):
        pass
    assert flush_tracing()
    span = receiver.wait_for_span("env-span")
    assert span.service_name == "from-env"
    assert span.resource["deployment.environment"] == "test"


def test_arguments_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    with OtlpReceiver() as wrong, OtlpReceiver() as right:
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", wrong.endpoint)
        monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
        configure_tracing("otlp", right.endpoint + "/", service_name="from-arg")
        with tracer.start_as_current_span("arg-span"):
            pass
        assert flush_tracing()
        assert right.wait_for_span("arg-span").service_name == "from-arg"
        assert wrong.spans == []


def test_default_service_name_and_no_export_by_default(receiver: OtlpReceiver) -> None:
    configure_tracing()  # no arguments, no OTEL_* variables: off
    assert not tracing_active()
    with tracer.start_as_current_span("dropped") as span:
        assert not span.is_recording()
    configure_tracing("otlp", receiver.endpoint)
    with tracer.start_as_current_span("kept"):
        pass
    assert flush_tracing()
    assert receiver.wait_for_span("kept").service_name == "muxgate-gateway"
    assert "dropped" not in {s.name for s in receiver.spans}


def test_sdk_disabled_wins(receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    configure_tracing("otlp", receiver.endpoint)
    assert not tracing_active()
    with tracer.start_as_current_span("nothing") as span:
        assert not span.is_recording()


def test_configure_is_idempotent_and_reconfigurable(receiver: OtlpReceiver) -> None:
    configure_tracing("otlp", receiver.endpoint)
    configure_tracing("otlp", receiver.endpoint)  # same: no second exporter
    with tracer.start_as_current_span("once"):
        pass
    assert flush_tracing()
    receiver.wait_for_span("once")
    assert [s.name for s in receiver.spans] == ["once"]

    with OtlpReceiver() as other:
        configure_tracing("otlp", other.endpoint)  # old provider flushed and replaced
        with tracer.start_as_current_span("moved"):
            pass
        assert flush_tracing()
        other.wait_for_span("moved")
    assert "moved" not in {s.name for s in receiver.spans}


def test_shutdown_flushes_pending_spans(receiver: OtlpReceiver) -> None:
    configure_tracing("otlp", receiver.endpoint)
    with tracer.start_as_current_span("last-words"):
        pass
    shutdown_tracing()
    receiver.wait_for_span("last-words")
    assert not tracing_active()
    shutdown_tracing()  # twice is fine


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(TracingError, match="unknown trace exporter"):
        configure_tracing("jaeger")
    with pytest.raises(TracingError, match="http"):
        configure_tracing("otlp", "127.0.0.1:4318")


def test_console_exporter_writes_to_stderr_only(capfd: pytest.CaptureFixture[str]) -> None:
    configure_tracing("console")
    with tracer.start_as_current_span("to-console"):
        pass
    shutdown_tracing()
    out, err = capfd.readouterr()
    assert out == ""
    assert '"name": "to-console"' in err


def test_traceparent_round_trip_in_process(receiver: OtlpReceiver) -> None:
    assert inject_traceparent() == (None, None)  # no span, nothing to carry
    configure_tracing("otlp", receiver.endpoint)
    with tracer.start_as_current_span("gateway") as parent:
        traceparent, tracestate = inject_traceparent()
    assert traceparent is not None
    ctx = parent.get_span_context()
    version, trace_id, span_id, flags = traceparent.split("-")
    assert (version, trace_id, span_id) == ("00", f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}")
    assert int(flags, 16) & 0x01  # sampled
    assert tracestate is None

    with tracer.start_as_current_span("replica", context=extract_context(traceparent, tracestate)):
        pass
    with tracer.start_as_current_span("orphan", context=extract_context("garbage")):
        pass
    assert flush_tracing()
    spans = by_name(receiver.wait_for(lambda s: len(s) >= 3))
    assert spans["replica"].parent_span_id == spans["gateway"].span_id
    assert spans["replica"].trace_id == spans["gateway"].trace_id
    assert spans["orphan"].parent_span_id is None
    assert spans["orphan"].trace_id != spans["gateway"].trace_id


CHILD = textwrap.dedent(
    """
    import json, sys
    from opentelemetry import trace
    from muxgate.replicas._propagation import extract_context
    from muxgate.replicas._tracing import configure_tracing, shutdown_tracing

    args = json.loads(sys.argv[1])
    configure_tracing(service_name="muxgate-replica",
                      resource_attributes={"muxgate.replica_id": "Model#r1"})
    tracer = trace.get_tracer("muxgate")
    ctx = extract_context(args["traceparent"], args["tracestate"])
    with tracer.start_as_current_span("muxgate.model.load", context=ctx) as span:
        span.set_attribute("muxgate.model_id", "42")
    shutdown_tracing()
    """
)


def test_trace_context_crosses_a_process_boundary(receiver: OtlpReceiver) -> None:
    configure_tracing("otlp", receiver.endpoint)
    with tracer.start_as_current_span("muxgate.route"):
        traceparent, tracestate = inject_traceparent()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
    }
    args = json.dumps({"traceparent": traceparent, "tracestate": tracestate})
    subprocess.run([sys.executable, "-c", CHILD, args], env=env, check=True, timeout=60)
    assert flush_tracing()
    spans = by_name(receiver.wait_for(lambda s: len(s) >= 2))
    load, route = spans["muxgate.model.load"], spans["muxgate.route"]
    assert load.parent_span_id == route.span_id
    assert load.trace_id == route.trace_id
    assert load.attributes == {"muxgate.model_id": "42"}
    assert load.service_name == "muxgate-replica"
    assert load.resource["muxgate.replica_id"] == "Model#r1"
    assert route.service_name == "muxgate-gateway"


def test_an_endpoint_alone_means_otlp(
    receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    assert not exports_spans(None, None)  # a bare install exports nothing
    assert exports_spans(None, receiver.endpoint)
    configure_tracing(None, receiver.endpoint)
    with tracer.start_as_current_span("by-endpoint"):
        pass
    assert flush_tracing()
    receiver.wait_for_span("by-endpoint")

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    assert exports_spans(None, None)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")  # an explicit choice wins
    assert not exports_spans(None, None)
