"""The status page of a REAL gateway, in headless Chromium (Playwright).

A gateway runs in this process with one replica of
``observability_apps:Observed`` (two models per replica, real torch files).
The browser opens ``/-/``, sees the replica running with no models, then
the test sends requests with model ids and the page shows, live: the model
chips (LRU order), the loads (with their durations) and the eviction (reason
``lru``) in "recent loads and unloads", from the gateway's event log, and a
non-zero request rate. A screenshot is kept as a test artifact in
``test-artifacts/status_page.png``.

Playwright's async API runs on the test's event loop next to the gateway;
the browser is the system's Chromium (never a download).
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest
from gateway_harness import MODEL, observed_gateway
from headless_chromium import CHROMIUM_ARGS
from waiting import wait_until

from muxgate.gateway._serve import Gateway

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
#: the page polls once a second; a few polls' worth of patience
UI_TIMEOUT_MS = 8000
NONZERO_RATE = re.compile(r"^(?!0\.0$)\d+\.\d$")
#: how the page shows a duration the replica measured
TOOK = r" in \d+\.\d+ (ms|s)$"

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.access(CHROMIUM, os.X_OK),
        reason=f"{CHROMIUM} is missing (`make test` installs chromium on Debian)",
    ),
]


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    async with observed_gateway(tmp_path, ["1", "2", "3"]) as gw:
        yield gw


async def steady_traffic(client: httpx.AsyncClient) -> None:
    """About 20 requests a second without a model id, until cancelled."""
    while True:
        r = await client.post("/")
        assert r.status_code == 200
        await anyio.sleep(0.05)  # pacing of a load generator, not synchronisation


async def test_status_page_shows_replicas_models_events_and_rate(gateway: Gateway) -> None:
    from playwright.async_api import async_playwright, expect

    expect.set_options(timeout=UI_TIMEOUT_MS)  # global in playwright: reset below
    async with (
        async_playwright() as p,
        httpx.AsyncClient(base_url=gateway.url, timeout=30) as client,
    ):
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 720})
            # Anything the page fetches must come from the gateway itself.
            foreign: list[str] = []
            page.on(
                "request",
                lambda req: None if req.url.startswith(gateway.url) else foreign.append(req.url),
            )
            await page.goto(f"{gateway.url}/-/")

            await expect(page.locator("#conn")).to_have_attribute("data-ok", "true")
            dep = page.locator('[data-deployment="Observed"]')
            rows = dep.locator("[data-replica-id]")
            await expect(rows).to_have_count(1)
            await expect(rows.first).to_have_attribute("data-state", "running")
            await expect(dep.locator("[data-model-id]")).to_have_count(0)
            replica_id = await rows.first.get_attribute("data-replica-id")

            r = await client.post("/", headers={MODEL: "1"})
            assert r.status_code == 200
            assert r.headers["x-muxgate-replica"] == replica_id
            chip = rows.first.locator('[data-model-id="1"]')
            await expect(chip).to_be_visible()
            await expect(chip).to_have_attribute("data-loading", "false")
            await expect(dep.locator('[data-event="loaded"]')).to_have_text(
                re.compile(f"loaded 1 on {re.escape(str(replica_id))}{TOOK}")
            )
            # Request rate: the page shows the rate between its last two polls,
            # so keep requests (without a model id: no cache effect) flowing
            # until it shows one, rather than racing a one-poll window.
            async with anyio.create_task_group() as traffic:
                traffic.start_soon(steady_traffic, client)
                await expect(dep.locator('[data-field="rate"]')).to_have_text(NONZERO_RATE)
                await expect(page.locator("#total-rate")).to_have_text(NONZERO_RATE)
                traffic.cancel_scope.cancel()

            # Two more models: the cache holds two, so model 1 is evicted.
            for model_id in ("2", "3"):
                r = await client.post("/", headers={MODEL: model_id})
                assert r.status_code == 200
            chips = rows.first.locator("[data-model-id]")
            await expect(chips).to_have_count(2)
            assert await chips.evaluate_all("els => els.map(e => e.dataset.modelId)") == [
                "2",
                "3",
            ]
            await expect(dep.locator('[data-event="unloaded"]')).to_have_text(
                re.compile(f"unloaded 1 from {re.escape(str(replica_id))} \\(lru\\){TOOK}")
            )
            await expect(dep.locator('[data-event="loaded"]')).to_have_count(3)
            await expect(dep.locator('[data-field="hit-ratio"]')).to_have_text("0%")

            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "status_page.png"), full_page=True)
            assert foreign == []
        finally:
            await browser.close()
            expect.set_options(timeout=None)


async def mixed_traffic(client: httpx.AsyncClient) -> None:
    """Requests for models 1 (hot), 2 and 3 (colder), until cancelled."""
    cycle = ["1", "1", "1", "1", "2", "1", "1", "3", "1", "2"]
    i = 0
    while True:
        r = await client.post("/", headers={MODEL: cycle[i % len(cycle)]})
        assert r.status_code == 200
        i += 1
        await anyio.sleep(0.02)  # pacing of a load generator, not synchronisation


async def test_status_page_charts_and_hottest_models(tmp_path: Path) -> None:
    """History from before the page opened: the charts are drawn at its first
    poll; the hottest models show where they live. Screenshot checked for
    drawn lines."""
    from playwright.async_api import async_playwright, expect

    expect.set_options(timeout=UI_TIMEOUT_MS)
    async with (
        observed_gateway(tmp_path, ["1", "2", "3"], deployment={"num_replicas": 2}) as gateway,
        httpx.AsyncClient(base_url=gateway.url, timeout=30) as client,
        async_playwright() as p,
    ):
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            dep = page.locator('[data-deployment="Observed"]')
            async with anyio.create_task_group() as traffic:
                traffic.start_soon(mixed_traffic, client)

                async def history_has_traffic() -> bool:
                    h = (await client.get("/-/history")).json()["deployments"]["Observed"]
                    return len(h["time"]) >= 3 and sum(h["requests_per_s"][-2:]) > 0

                await wait_until(history_has_traffic, within_s=30)
                body = (await client.get("/-/history")).json()
                observed = body["deployments"]["Observed"]
                assert body["interval_s"] == 2.0
                assert set(observed) >= {
                    "time",
                    "requests_per_s",
                    "errors_per_s",
                    "p50_ms",
                    "p99_ms",
                    "hit_ratio",
                    "loads_per_s",
                    "models",
                }
                assert observed["models"][0]["model_id"] == "1"  # the hot one ranks first
                assert observed["models"][0]["replicas"]

                await page.goto(f"{gateway.url}/-/")
                # Full at the first poll: the history was kept before the page
                # opened. A poll renders before it marks the connection live,
                # so the charts are there as soon as #conn says so.
                await expect(page.locator("#conn")).to_have_attribute("data-ok", "true")
                for key, series in (
                    ("rate", ("req/s", "5xx/s")),
                    ("latency", ("p50", "p99")),
                    ("hit-ratio", ("hits",)),
                    ("loads", ("loads/s",)),
                ):
                    chart = dep.locator(f'[data-chart="{key}"]')
                    for label in series:  # a line per series (a gap would split it)
                        lines = chart.locator(f'polyline[data-series="{label}"]')
                        assert await lines.count() >= 1, (key, label)
                rate_line = dep.locator('[data-chart="rate"] polyline[data-series="req/s"]')
                points = (await rate_line.get_attribute("points") or "").split()
                assert len(points) >= 2
                await expect(dep.locator('[data-chart="rate"] [data-field="now"]')).to_have_text(
                    re.compile(r"^\d+\.\d / \d+\.\d$")
                )
                hot = dep.locator('[data-model-row="1"]')
                await expect(hot).to_be_visible()
                await expect(hot.locator(".chip").first).to_have_text(re.compile(r"^Observed#"))
                await expect(dep.locator("[data-model-row]").first).to_have_attribute(
                    "data-model-row", "1"
                )
                traffic.cancel_scope.cancel()  # ends this block: nothing may follow here

            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "status_page_charts.png"), full_page=True)
            # The rate chart's pixels: its line is drawn in the accent colour.
            shot = await dep.locator('[data-chart="rate"] svg').screenshot()
            drawn = await page.evaluate(_COUNT_ACCENT_PIXELS, list(shot))
            assert drawn > 50, drawn
        finally:
            await browser.close()
            expect.set_options(timeout=None)


# Decodes a PNG (bytes as a list) in the page and counts pixels near the
# page's --accent colour.
_COUNT_ACCENT_PIXELS = """async (bytes) => {
  const blob = new Blob([new Uint8Array(bytes)], { type: "image/png" });
  const img = await createImageBitmap(blob);
  const canvas = new OffscreenCanvas(img.width, img.height);
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0);
  const probe = document.createElement("span");
  probe.style.color = getComputedStyle(document.documentElement).getPropertyValue("--accent");
  document.body.append(probe);
  const [r, g, b] = getComputedStyle(probe).color.match(/\\d+/g).map(Number);
  probe.remove();
  const data = ctx.getImageData(0, 0, img.width, img.height).data;
  let n = 0;
  for (let i = 0; i < data.length; i += 4) {
    if (Math.abs(data[i] - r) + Math.abs(data[i + 1] - g) + Math.abs(data[i + 2] - b) < 60) n++;
  }
  return n;
}"""


async def test_status_page_shows_start_failures_quarantine_and_memory(gateway: Gateway) -> None:
    """What /-/replicas says when things go wrong, as the page shows it. The
    real body is fetched and the failure fields are added at the seam (a
    start failure and a quarantine need their own broken deployments)."""
    import json

    from playwright.async_api import Route, async_playwright, expect

    async def with_problems(route: Route) -> None:
        response = await route.fetch()
        body = await response.json()
        dep = body["deployments"]["Observed"]
        dep["last_failure"] = "RuntimeError: registry unreachable (at /srv/app.py:12 in __init__)"
        dep["quarantined"] = [
            {"model_id": "poison", "until": 0, "retry_after_s": 30, "deaths": 3, "strikes": 1}
        ]
        for rep in dep["replicas"]:
            rep["rss_bytes"] = 512 * 1024 * 1024
            rep["model_bytes"] = 3 * 1024 * 1024
        await route.fulfill(response=response, body=json.dumps(body))

    expect.set_options(timeout=UI_TIMEOUT_MS)
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            await page.route("**/-/replicas", with_problems)
            await page.goto(f"{gateway.url}/-/")
            dep = page.locator('[data-deployment="Observed"]')
            await expect(dep.locator('[data-field="last-failure"]')).to_have_text(
                "last start failure: RuntimeError: registry unreachable"
                " (at /srv/app.py:12 in __init__)"
            )
            await expect(dep.locator('[data-field="quarantined"]')).to_have_text(
                re.compile(r"quarantined models:\s*poison")
            )
            await expect(dep.locator('[data-field="rss"]')).to_have_text("512 MiB")
            await expect(dep.locator('[data-field="model-bytes"]')).to_have_text("3 MiB")
        finally:
            await browser.close()
            expect.set_options(timeout=None)
