"""The ``muxgate.storage.fetch`` span and the per-load fetch log.

Kept apart from the fetch itself: what a fetch reports (its attributes, and
the ``(url, bytes)`` it appends to an enclosing load's log) is one job, how
the bytes arrive another.
"""

from __future__ import annotations

import enum
from typing import Final, Protocol

from opentelemetry import context as otel_context
from opentelemetry import trace


class Fetched(Protocol):
    """What a span records of a fetched object (``_fetch.Artifact``)."""

    @property
    def url(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def cache_hit(self) -> bool: ...

    @property
    def strategy(self) -> enum.Enum: ...

    @property
    def source(self) -> str: ...

    @property
    def stale(self) -> bool: ...


def _tracer() -> trace.Tracer:
    # Looked up per call: the provider may be installed after import.
    return trace.get_tracer("muxgate")


#: OpenTelemetry context key under which an enclosing operation (the SDK's
#: model load) may put a list: every fetch inside it appends ``(url, bytes)``,
#: so the load span can carry what it read. A plain string, so that neither
#: package has to import the other.
FETCH_LOG_KEY: Final = "muxgate.fetch_log"


def record(span: trace.Span, artifact: Fetched, seconds: float) -> None:
    log = otel_context.get_value(FETCH_LOG_KEY)
    if isinstance(log, list):
        log.append((artifact.url, artifact.size))
    span.set_attributes(
        {
            "muxgate.duration_ms": seconds * 1000,
            "muxgate.bytes": artifact.size,
            "muxgate.cache_hit": artifact.cache_hit,
            "muxgate.storage.strategy": artifact.strategy.value,
            "muxgate.source": artifact.source,
            "muxgate.stale": artifact.stale,
        }
    )


class FetchSpan:
    """``tracer.start_as_current_span`` for the fetch span, as a plain class:
    the generator-based context managers of the OpenTelemetry API cost about
    5 us per load here, a measurable share of a small local load.

    Like ``start_as_current_span(record_exception=True,
    set_status_on_exception=True)``, except that a cancellation is not
    recorded as an error of the fetch.
    """

    __slots__ = ("_span", "_token")

    def __init__(self, safe_url: str) -> None:
        self._span = _tracer().start_span(
            "muxgate.storage.fetch", attributes={"url.full": safe_url}
        )
        self._token: object = None

    def __enter__(self) -> trace.Span:
        self._token = otel_context.attach(trace.set_span_in_context(self._span))
        return self._span

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        try:
            if isinstance(exc, Exception) and self._span.is_recording():
                self._span.record_exception(exc)
                self._span.set_status(
                    trace.Status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}")
                )
        finally:
            otel_context.detach(self._token)  # type: ignore[arg-type]
            self._span.end()
