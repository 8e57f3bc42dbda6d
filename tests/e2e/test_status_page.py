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
