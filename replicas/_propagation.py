"""Trace context across the gateway-replica boundary.

It travels in the ``traceparent`` and ``tracestate`` fields of a ``Call``
frame (and in the same-named HTTP headers of a handle call):
``inject_traceparent`` on the sending side, ``extract_context`` on the
receiving one. Always W3C Trace Context, independent of whatever
``OTEL_PROPAGATORS`` selects for other HTTP traffic, so both sides agree
whatever their environment says.
"""

from __future__ import annotations

from opentelemetry import context as otel_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = ["extract_context", "inject_traceparent"]

_PROPAGATOR = TraceContextTextMapPropagator()


def inject_traceparent(
    context: otel_context.Context | None = None,
) -> tuple[str | None, str | None]:
    """W3C ``(traceparent, tracestate)`` of the current span (or of ``context``).

    Both are None when there is no valid span context to propagate.
    """
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=context)
    return carrier.get("traceparent"), carrier.get("tracestate")


def extract_context(
    traceparent: str | None,
    tracestate: str | None = None,
    context: otel_context.Context | None = None,
) -> otel_context.Context:
    """A context whose parent span is the remote one ``traceparent`` names.

    Use it as ``tracer.start_as_current_span(name, context=ctx)``. A missing
    or malformed ``traceparent`` gives a context without a remote parent (so
    the next span starts a new trace), never an error.
    """
    carrier: dict[str, str] = {}
    if traceparent:
        carrier["traceparent"] = traceparent
        if tracestate:
            carrier["tracestate"] = tracestate
    return _PROPAGATOR.extract(carrier, context=context)
