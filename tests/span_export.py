"""This process's spans, exported through muxgate's own tracing set-up to a real receiver."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
from otlp_receiver import OtlpReceiver

from muxgate.replicas._tracing import configure_tracing, shutdown_tracing

#: variables that would switch the set-up off or elsewhere if the environment had them
OTEL_SWITCHES = ("OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_TRACES_SAMPLER")


@contextlib.contextmanager
def exporting_spans(monkeypatch: pytest.MonkeyPatch, service_name: str) -> Iterator[OtlpReceiver]:
    """Configure tracing to export to a fresh ``OtlpReceiver``; shut it down after.

    Through ``configure_tracing``, not a global SDK provider set here, which
    would shadow muxgate's for every later test in the session.
    """
    for name in OTEL_SWITCHES:
        monkeypatch.delenv(name, raising=False)
    with OtlpReceiver() as receiver:
        configure_tracing("otlp", receiver.endpoint, service_name=service_name)
        try:
            yield receiver
        finally:
            shutdown_tracing()
