"""Model load/unload events in ``GET /-/replicas`` of a real gateway.

One replica of ``observability_apps:Observed`` (two models per replica, real
torch files). Models 1, 2 and 3 are requested in turn, so loading 3 evicts 1
(reason ``lru``); the replica logs each finished load and unload and the
gateway picks them up with its next ping. A scale-down to zero then drains
the replica, whose ``drain`` unloads come with its ``Drained`` message.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway_harness import MODEL, observed_gateway
from waiting import wait_until

from muxgate.gateway._serve import Gateway

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

EVENT_KEYS = {"time", "replica", "kind", "model", "duration_ms", "reason"}


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    async with observed_gateway(tmp_path, ["1", "2", "3"]) as gw:
        yield gw


async def deployment_view(client: httpx.AsyncClient) -> dict[str, Any]:
    r = await client.get("/-/replicas")
    assert r.status_code == 200
    view: dict[str, Any] = r.json()["deployments"]["Observed"]
    return view


def outline(events: list[dict[str, Any]]) -> list[tuple[str, str, str | None]]:
    return [(e["kind"], e["model"], e["reason"]) for e in events]


async def test_loads_and_an_lru_eviction_then_a_drain_show_up_as_events(
    gateway: Gateway,
) -> None:
    started = time.time()
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        before = await deployment_view(client)
        assert before["events"] == []
        (replica,) = before["replicas"]
        for model_id in ("1", "2", "3"):
            r = await client.post("/", headers={MODEL: model_id})
            assert r.status_code == 200

        events: list[dict[str, Any]] = []

        async def evicted() -> bool:
            nonlocal events
            events = (await deployment_view(client))["events"]
            return len(events) >= 4

        await wait_until(evicted, within_s=10)
        assert outline(events) == [
            ("load", "1", None),
            ("load", "2", None),
            ("load", "3", None),  # model 1 is evicted once model 3 is built
            ("unload", "1", "lru"),
        ]
        for event in events:
            assert set(event) == EVENT_KEYS
            assert event["replica"] == replica["id"]
            assert event["duration_ms"] is not None and event["duration_ms"] >= 0.0
            assert started <= event["time"] <= time.time()
        assert [e["time"] for e in events] == sorted(e["time"] for e in events)
        # The replica entries keep their keys: events are per deployment.
        assert "events" not in (await deployment_view(client))["replicas"][0]

        gateway.pools["Observed"].set_target(0)  # drain: both models unloaded

        async def drained() -> bool:
            nonlocal events
            view = await deployment_view(client)
            events = view["events"]
            return not view["replicas"]

        await wait_until(drained, within_s=20)
    assert outline(events[4:]) == [("unload", "2", "drain"), ("unload", "3", "drain")]
    assert all(e["replica"] == replica["id"] for e in events)
