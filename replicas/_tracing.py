"""OpenTelemetry set-up for the gateway and replica processes.

``configure_tracing`` installs the OpenTelemetry SDK behind the global tracer
provider, exporting spans in batches over OTLP/HTTP (or to the console, or
nowhere). Each setting comes from, in order: the argument, the standard
``OTEL_*`` environment variable, a default. The environment is read when
``configure_tracing`` is called, never at import time.

=============================  ==========================================
argument                       environment fallback
=============================  ==========================================
``exporter``                   ``OTEL_TRACES_EXPORTER`` (``otlp``,
                               ``console``, ``none``; comma-separated list)
``endpoint``                   ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``
                               (used as is), ``OTEL_EXPORTER_OTLP_ENDPOINT``
                               (``/v1/traces`` appended), else
                               ``http://localhost:4318/v1/traces``
``service_name``               ``OTEL_SERVICE_NAME``, else
                               ``muxgate-gateway``
``resource_attributes``        merged over ``OTEL_RESOURCE_ATTRIBUTES``
=============================  ==========================================

``OTEL_SDK_DISABLED=true`` turns tracing off whatever the arguments say: it
is the operator's kill switch. Everything else the SDK reads itself
(``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*``, ``OTEL_EXPORTER_OTLP_HEADERS``,
``..._TIMEOUT``, ``..._COMPRESSION``) keeps working.

Reconfiguring: the OpenTelemetry API lets a process set its global tracer
provider only once, and modules keep the tracers they got at import time. So
the global provider is a small switch installed on first use; each
``configure_tracing`` with a different configuration shuts the previous SDK
provider down (flushing it) and points the switch at a new one. Tracers
handed out earlier follow the switch. Calling it again with the same
configuration does nothing.

How trace context crosses the gateway-replica boundary is part of the wire
contract: ``muxgate.replicas._propagation``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
)
from opentelemetry.util.types import Attributes

__all__ = [
    "DEFAULT_SERVICE_NAME",
    "EXPORTERS",
    "TracingError",
    "configure_tracing",
    "flush_tracing",
    "shutdown_tracing",
    "tracing_active",
]

logger = logging.getLogger("muxgate.tracing")

DEFAULT_SERVICE_NAME = "muxgate-gateway"
#: Exporter names accepted by ``configure_tracing`` and ``OTEL_TRACES_EXPORTER``.
EXPORTERS = ("otlp", "console", "none")
_TRACES_PATH = "/v1/traces"


class TracingError(ValueError):
    """The tracing configuration is invalid (e.g. an unknown exporter)."""


class _Switch(trace.TracerProvider):
    """Global provider whose target can change; a no-op one until configured."""

    def __init__(self) -> None:
        self.target: trace.TracerProvider = trace.NoOpTracerProvider()

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: Attributes | None = None,
    ) -> trace.Tracer:
        return _SwitchTracer(
            self, instrumenting_module_name, instrumenting_library_version, schema_url, attributes
        )


class _SwitchTracer(trace.Tracer):
    """Resolves the switch's current provider on every span it starts."""

    def __init__(
        self,
        switch: _Switch,
        name: str,
        version: str | None,
        schema_url: str | None,
        attributes: Attributes | None,
    ) -> None:
        self._switch = switch
        self._args = (name, version, schema_url, attributes)
        self._cache: tuple[trace.TracerProvider, trace.Tracer] | None = None

    def _tracer(self) -> trace.Tracer:
        target = self._switch.target
        cached = self._cache
        if cached is None or cached[0] is not target:
            cached = (target, target.get_tracer(*self._args))
            self._cache = cached
        return cached[1]

    def start_span(self, *args: Any, **kwargs: Any) -> trace.Span:
        return self._tracer().start_span(*args, **kwargs)

    def start_as_current_span(self, *args: Any, **kwargs: Any) -> Any:
        # Any: the API's return type (_AgnosticContextManager) is private.
        return self._tracer().start_as_current_span(*args, **kwargs)


_lock = threading.Lock()
_switch: _Switch | None = None
_sdk: SdkTracerProvider | None = None
_config_key: tuple[Any, ...] | None = None


def _install_switch() -> _Switch | None:
    """Make the switch the global provider (once). None if someone else owns it."""
    global _switch
    if _switch is not None:
        return _switch
    switch = _Switch()
    trace.set_tracer_provider(switch)
    if trace.get_tracer_provider() is not switch:
        logger.warning(
            "A global tracer provider was set before muxgate configured tracing; "
            "muxgate leaves it in place and exports nothing itself."
        )
        return None
    _switch = switch
    return switch


def _env_true(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def _resolve_exporters(
    exporter: str | Sequence[str] | None, endpoint: str | None, env: Mapping[str, str]
) -> list[str]:
    if exporter is None:
        # OpenTelemetry's default exporter is otlp; we export only once a
        # collector is named somewhere, so that a bare install stays quiet.
        named = bool(endpoint) or any(env.get(var) for var in _OTLP_ENDPOINT_VARS)
        exporter = env.get("OTEL_TRACES_EXPORTER", "otlp" if named else "none")
    names = exporter.split(",") if isinstance(exporter, str) else list(exporter)
    out: list[str] = []
    for raw in names:
        name = raw.strip().lower()
        if name not in EXPORTERS:
            raise TracingError(f"unknown trace exporter {raw!r}; expected one of {EXPORTERS}")
        if name != "none" and name not in out:
            out.append(name)
    return out


_OTLP_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def _traces_url(endpoint: str) -> str:
    """``http://host:4318`` -> ``http://host:4318/v1/traces``; a URL with a path is kept."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise TracingError(f"OTLP endpoint must be an http(s) URL, got {endpoint!r}")
    if parts.path in ("", "/"):
        return endpoint.rstrip("/") + _TRACES_PATH
    return endpoint


def _resolve_endpoint(endpoint: str | None, env: Mapping[str, str]) -> str | None:
    """The OTLP traces URL, or None to let the exporter apply its own default."""
    if endpoint:
        return _traces_url(endpoint)
    if env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if base:
        return base.rstrip("/") + _TRACES_PATH
    return None


def _make_processor(name: str, endpoint: str | None) -> SpanProcessor:
    if name == "console":
        # stderr, never stdout: a replica's stdout carries its READY line to
        # the launcher. Synchronous so spans show up as they end (debugging).
        return SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stderr))
    # Imported here: the exporter pulls in requests and protobuf, which a
    # process with tracing off need not pay for.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint))


def configure_tracing(
    exporter: str | Sequence[str] | None = None,
    endpoint: str | None = None,
    service_name: str | None = None,
    *,
    resource_attributes: Mapping[str, str | int | float | bool] | None = None,
) -> None:
    """Set up (or change, or turn off) span export for this process.

    Args:
        exporter: ``"otlp"``, ``"console"``, ``"none"`` or several
            (comma-separated or a sequence); None: ``OTEL_TRACES_EXPORTER``,
            else ``"otlp"`` when an endpoint is given (here or in
            ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``..._TRACES_ENDPOINT``), else
            ``"none"``.
        endpoint: OTLP/HTTP collector, e.g. ``http://127.0.0.1:4318`` (the
            ``/v1/traces`` path is added when the URL has none); None: the
            ``OTEL_EXPORTER_OTLP_*`` variables.
        service_name: ``service.name`` of the resource; None:
            ``OTEL_SERVICE_NAME``, else ``muxgate-gateway``.
        resource_attributes: extra resource attributes (e.g.
            ``{"muxgate.deployment": "Model", "muxgate.replica_id": "Model#ab12"}``),
            merged over ``OTEL_RESOURCE_ATTRIBUTES``.

    Raises:
        TracingError: unknown exporter or malformed endpoint.
    """
    global _sdk, _config_key
    env = dict(os.environ)
    disabled = _env_true(env.get("OTEL_SDK_DISABLED"))
    exporters = [] if disabled else _resolve_exporters(exporter, endpoint, env)
    traces_url = _resolve_endpoint(endpoint, env) if "otlp" in exporters else None
    attributes: dict[str, str | int | float | bool] = dict(resource_attributes or {})
    if service_name:
        attributes[SERVICE_NAME] = service_name
    elif not env.get("OTEL_SERVICE_NAME"):
        attributes[SERVICE_NAME] = DEFAULT_SERVICE_NAME
    key = (
        tuple(exporters),
        traces_url,
        tuple(sorted(attributes.items())),
        tuple(sorted((k, v) for k, v in env.items() if k.startswith("OTEL_"))),
    )
    with _lock:
        if key == _config_key:
            return
        switch = _install_switch()
        if switch is None:
            return
        previous = _sdk
        if exporters:
            sdk = SdkTracerProvider(resource=Resource.create(attributes))
            for name in exporters:
                sdk.add_span_processor(_make_processor(name, traces_url))
            switch.target, _sdk = sdk, sdk
        else:
            switch.target, _sdk = trace.NoOpTracerProvider(), None
        _config_key = key
    if previous is not None:
        previous.shutdown()
    logger.debug("tracing: exporters=%s endpoint=%s", exporters or ["none"], traces_url)


def exports_spans(exporter: str | Sequence[str] | None, endpoint: str | None) -> bool:
    """Whether ``configure_tracing(exporter, endpoint)`` would export anything here."""
    env = os.environ
    if _env_true(env.get("OTEL_SDK_DISABLED")):
        return False
    return bool(_resolve_exporters(exporter, endpoint, env))


def tracing_active() -> bool:
    """Whether spans are currently recorded and exported."""
    return _sdk is not None


def flush_tracing(timeout_s: float = 5.0) -> bool:
    """Export every span ended so far; True if done within ``timeout_s``."""
    sdk = _sdk
    if sdk is None:
        return True
    return sdk.force_flush(int(timeout_s * 1000))


def shutdown_tracing() -> None:
    """Flush and stop exporting; spans become no-ops until configured again.

    Call it when the process is about to exit (gateway shutdown, replica
    after ``Drained``) so batched spans are not lost.
    """
    global _sdk, _config_key
    with _lock:
        previous, _sdk, _config_key = _sdk, None, None
        if _switch is not None:
            _switch.target = trace.NoOpTracerProvider()
    if previous is not None:
        previous.shutdown()
