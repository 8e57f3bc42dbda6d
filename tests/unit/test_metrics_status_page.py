"""The status page in a real headless Chromium, against a stand-in admin API.

The stand-in serves the real page file, a /-/replicas snapshot the test
changes, and /-/metrics rendered by a real GatewayMetrics. It checks what a
user sees: replicas, models as chips in LRU order with loading ones marked,
the deployment's load/unload events (also those from before the page was
opened), replica removals derived from successive snapshots, a request rate,
and that ?token= becomes a bearer header.
"""

from __future__ import annotations

import importlib.resources
import json
import re
import shutil
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from headless_chromium import CHROMIUM_ARGS

from muxgate.gateway._metrics import GatewayMetrics

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed (`make system-deps` installs it)"
)
TOKEN = "s3cret"
PAGE = importlib.resources.files("muxgate.gateway").joinpath("static/status.html").read_bytes()


class AdminStandIn:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.snapshot: dict[str, Any] = {"deployments": {}}
        self.metrics = GatewayMetrics()
        self.auth_seen: list[str | None] = []

    def set_snapshot(self, snapshot: dict[str, Any]) -> None:
        with self.lock:
            self.snapshot = snapshot


def make_handler(state: AdminStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            if path == "/-/":
                self.answer(200, "text/html; charset=utf-8", PAGE)
                return
            if path not in ("/-/replicas", "/-/metrics"):
                self.answer(404, "text/plain", b"")  # e.g. the browser's /favicon.ico
                return
            auth = self.headers.get("Authorization")
            state.auth_seen.append(auth)
            if auth != f"Bearer {TOKEN}":
                self.answer(401, "application/json", b"{}")
            elif path == "/-/replicas":
                with state.lock:
                    body = json.dumps(state.snapshot).encode()
                self.answer(200, "application/json", body)
            elif path == "/-/metrics":
                body, content_type = state.metrics.render()
                self.answer(200, content_type, body)

        def answer(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def admin() -> Iterator[tuple[AdminStandIn, str]]:
    state = AdminStandIn()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def replica(rid: str, models: list[str], loading: list[str], in_flight: int = 0) -> dict[str, Any]:
    return {
        "id": rid,
        "state": "running",
        "pid": 1234,
        "address": f"unix:/tmp/{rid}.sock",
        "in_flight": in_flight,
        "models": models,
        "loading": loading,
    }


def event(
    at: float, kind: str, model: str, duration_ms: float | None, reason: str | None = None
) -> dict[str, Any]:
    return {
        "time": at,
        "replica": "Model#a",
        "kind": kind,
        "model": model,
        "duration_ms": duration_ms,
        "reason": reason,
    }


def test_status_page_shows_replicas_models_events_and_rate(
    admin: tuple[AdminStandIn, str],
) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    state, url = admin
    # Loaded a minute before the page opens: still listed, from the gateway's log.
    earlier = [
        event(time.time() - 60, "load", "m1", 812.5),
        event(time.time() - 59, "load", "m2", 1520.0),
    ]
    state.set_snapshot(
        {
            "deployments": {
                "Model": {
                    "target_replicas": 2,
                    "queued": 3,
                    "replicas": [
                        replica("Model#a", ["m1", "m2"], ["m3"], in_flight=2),
                        replica("Model#b", [], []),
                    ],
                    "events": earlier,
                    "lease": {"role": "follower", "holder": "gw2:9:cd", "leader": "gw1:4:ab"},
                }
            }
        }
    )
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{url}/-/?token={TOKEN}")
            expect = sync_api.expect
            dep = page.locator('[data-deployment="Model"]')
            expect(page.locator("#conn")).to_have_attribute("data-ok", "true")
            expect(dep.locator('[data-field="target"]')).to_have_text("2")
            expect(dep.locator('[data-field="queued"]')).to_have_text("3")
            expect(dep.locator('[data-field="lease"]')).to_have_text("lease: follower of gw1:4:ab")
            a = dep.locator('[data-replica-id="Model#a"]')
            expect(a.locator('[data-field="in-flight"]')).to_have_text("2")
            chips = a.locator("[data-model-id]")
            expect(chips).to_have_count(3)
            assert chips.evaluate_all("els => els.map(e => e.dataset.modelId)") == [
                "m1",
                "m2",
                "m3",
            ]
            expect(a.locator('[data-model-id="m3"]')).to_have_attribute("data-loading", "true")
            expect(a.locator('[data-model-id="m1"]')).to_have_attribute("data-loading", "false")
            expect(dep.locator('[data-replica-id="Model#b"] [data-model-id]')).to_have_count(0)
            loaded = dep.locator('[data-event="loaded"]')
            expect(loaded).to_have_count(2)
            # Newest first, with the durations the gateway reported.
            expect(loaded.nth(0)).to_contain_text("loaded m2 on Model#a in 1.52 s")
            expect(loaded.nth(1)).to_contain_text("loaded m1 on Model#a in 812.5 ms")

            # m3 finishes loading, m1 is evicted, a replica goes away; traffic flows.
            for _ in range(50):
                state.metrics.observe_request("Model", 200, 0.01, "m2")
            state.set_snapshot(
                {
                    "deployments": {
                        "Model": {
                            "target_replicas": 1,
                            "queued": 0,
                            "replicas": [replica("Model#a", ["m2", "m3"], [])],
                            "events": [
                                *earlier,
                                event(time.time(), "unload", "m1", 3.25, "lru"),
                                event(time.time(), "load", "m3", 95.0),
                                event(time.time(), "load_failed", "m9", 4.0, "OSError"),
                            ],
                        }
                    }
                }
            )
            events = dep.locator("[data-event]")
            expect(loaded).to_have_count(3)
            expect(loaded.first).to_contain_text("loaded m3 on Model#a in 95.0 ms")
            expect(dep.locator('[data-event="unloaded"]')).to_have_text(
                re.compile(r"unloaded m1 from Model#a \(lru\) in 3\.3 ms$")
            )
            expect(dep.locator('[data-event="load-failed"]')).to_contain_text(
                "load of m9 on Model#a failed (OSError) in 4.0 ms"
            )
            expect(dep.locator('[data-event="replica-removed"]')).to_contain_text("Model#b")
            assert events.first.locator("time").get_attribute("datetime")
            expect(dep.locator("[data-replica-id]")).to_have_count(1)
            expect(dep.locator('[data-field="rate"]')).not_to_have_text("0.0")
            expect(dep.locator('[data-field="rate"]')).not_to_have_text("\u2013")
        finally:
            browser.close()
    assert set(state.auth_seen) == {f"Bearer {TOKEN}"}
