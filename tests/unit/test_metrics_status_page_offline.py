"""The status page works offline: one self-contained file that loads nothing
from other hosts, and fetches only admin routes next to itself."""

from __future__ import annotations

import importlib.resources
import re

PAGE = (
    importlib.resources.files("muxgate.gateway")
    .joinpath("static/status.html")
    .read_text(encoding="utf-8")
)


def test_no_absolute_or_protocol_relative_urls() -> None:
    # Any scheme://host (http, https, ws, ...) or a protocol-relative //host
    # in an attribute, CSS url() or @import would reach beyond the gateway.
    absolute = re.findall(r"\b[a-z][a-z0-9+.-]*://[^\s\"'<>)]*", PAGE, flags=re.IGNORECASE)
    assert absolute == []
    protocol_relative = re.findall(
        r"""(?:src|href|action)\s*=\s*["']\s*//|url\(\s*["']?\s*//|@import\s+["']?\s*//""",
        PAGE,
        flags=re.IGNORECASE,
    )
    assert protocol_relative == []


def test_no_external_resources_at_all() -> None:
    # Scripts and styles are inline; no <script src>, <link href>, <img>, fonts or frames.
    assert re.search(r"<script[^>]*\bsrc\s*=", PAGE, flags=re.IGNORECASE) is None
    assert re.search(r"<link\b", PAGE, flags=re.IGNORECASE) is None
    assert re.search(r"<(img|iframe|object|embed)\b", PAGE, flags=re.IGNORECASE) is None
    assert "@font-face" not in PAGE
    assert "@import" not in PAGE


def test_fetches_only_admin_routes_relative_to_the_page() -> None:
    fetched = re.findall(r"getText\(\s*\"([^\"]*)\"\s*\)", PAGE)
    assert sorted(fetched) == ["history", "metrics", "replicas"]
    # One fetch() call site, prefixed with the page's own /-/ base.
    assert re.findall(r"\bfetch\(([^,)]*)", PAGE) == ["base + path"]
    assert "XMLHttpRequest" not in PAGE
    assert "WebSocket" not in PAGE
    assert "EventSource" not in PAGE


def test_shows_request_rate_and_recent_loads_and_unloads() -> None:
    for hook in ('"rate"', '"errors"', '"hit-ratio"', '"events"', "total-rate"):
        assert hook in PAGE, hook
    assert "recent loads and unloads" in PAGE
    for kind in ('"loaded"', '"unloaded"', '"loading"'):
        assert kind in PAGE, kind
