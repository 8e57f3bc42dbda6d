"""Scale from zero with memory: the first replica after zero serves the
request that woke it, then loads the config's pinned and preload ids and the
deployment's hottest models, as many as fit (real replica processes, real
torch files: ``warm_apps:Sized``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from apps.warm_apps import linear_bytes, write_sized
from gateway_harness import MODEL, running_gateway
from waiting import wait_until

from muxgate.gateway._serve import Gateway

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

BUDGET = 5 * linear_bytes(8)  # five of the models below


@pytest.fixture(scope="module")
async def gateway(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    root = tmp_path_factory.mktemp("zero")
    write_sized(root, {f"p-{i}": 8 for i in range(8)})
    config = {
        "http": {"port": 0},
        "deployments": [
            {
                "name": "Zero",
                "import_path": "warm_apps:Sized",
                "init_kwargs": {"model_root": str(root)},
                "route_prefix": "/zero",
                "pinned": ["p-0"],
                "preload": ["p-1"],
                "max_bytes_per_replica": BUDGET,
                "autoscaling": {
                    "min_replicas": 0,
                    "max_replicas": 1,
                    "initial_replicas": 0,
                    "downscale_delay_s": 0.5,
                    "downscale_to_zero_delay_s": 1.0,
                    "metrics_interval_s": 0.1,
                    "look_back_period_s": 0.3,
                },
            }
        ],
    }
    async with running_gateway(config) as gw:
        yield gw


async def view(client: httpx.AsyncClient) -> dict[str, Any]:
    r = await client.get("/-/replicas")
    assert r.status_code == 200
    body: dict[str, Any] = r.json()["deployments"]["Zero"]
    return body


async def test_the_first_replica_after_zero_serves_then_warms_the_hottest(
    gateway: Gateway,
) -> None:
    pool = gateway.pools["Zero"]
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        # The first request wakes the deployment: that replica loads its pinned
        # and preload ids after serving it.
        r = await client.post("/zero", headers={MODEL: "p-2"})
        assert r.status_code == 200, r.text
        first = r.headers["x-muxgate-replica"]
        # the warm set: p-2 hottest, then p-3, p-4, p-5
        for model_id, times in (("p-2", 6), ("p-3", 4), ("p-4", 2), ("p-5", 1)):
            for _ in range(times):
                r = await client.post("/zero", headers={MODEL: model_id})
                assert r.status_code == 200, r.text
        # At zero, and the drained replica gone from /-/replicas (not still stopping).
        await asyncio.wait_for(pool.wait_for(lambda: pool.target == 0 and not pool.replicas), 30)

        r = await client.post("/zero", headers={MODEL: "p-7"})  # wakes it
        assert r.status_code == 200, r.text
        replica_id = r.headers["x-muxgate-replica"]
        assert replica_id != first

        def loads_in(snap: dict[str, Any]) -> list[str]:
            return [
                e["model"]
                for e in snap["events"]
                if e["replica"] == replica_id and e["kind"] == "load"
            ]

        async def warmed() -> dict[str, Any] | None:
            snap = await view(client)
            (rep,) = snap["replicas"]
            # The models and loading lists change with every reply; the pins
            # and the load events come with the replica's pongs, a second
            # apart: a pong between p-0's load and the last warming load
            # shows the pin with only some of the events.
            done = (
                len(rep["models"]) == 5
                and not rep["loading"]
                and rep["pinned"] == ["p-0"]
                and len(loads_in(snap)) >= 5
            )
            return snap if done else None

        snap = await wait_until(warmed, within_s=30, what="the warm set loaded")
        (rep,) = snap["replicas"]
        # p-7 (the waking request), the deferred pinned and preload ids, then the
        # hottest that fit: p-2 and p-3. p-4 did not fit and was not loaded.
        assert set(rep["models"]) == {"p-7", "p-0", "p-1", "p-2", "p-3"}
        loads = loads_in(snap)
        assert loads == ["p-7", "p-0", "p-1", "p-2", "p-3"]
        # and no warming load ran beside the waking one: each started after it ended
        # (events carry the end, wall clock, and the duration; 1 ms for rounding)
        ends = {
            e["model"]: (e["time"], e["duration_ms"] / 1e3)
            for e in snap["events"]
            if e["replica"] == replica_id and e["kind"] == "load"
        }
        woke_at = ends["p-7"][0]
        assert all(end - took >= woke_at - 1e-3 for end, took in list(ends.values())[1:])
        # the hottest are hits now: no further load (the cache is full, so a
        # load would have evicted one of them; the lists change with each reply)
        for model_id in ("p-2", "p-3", "p-0"):
            r = await client.post("/zero", headers={MODEL: model_id})
            assert r.headers["x-muxgate-replica"] == replica_id
        (rep,) = (await view(client))["replicas"]
        assert set(rep["models"]) == set(loads) and not rep["loading"]
