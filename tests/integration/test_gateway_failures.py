"""Replica death end to end: SIGKILL of a replica answers 502 for its
in-flight requests only, and the pool replaces it (real processes)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from gateway_harness import MODEL, running_gateway
from waiting import wait_until

from muxgate.gateway._serve import Gateway

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.fixture(scope="module")
async def gateway() -> AsyncIterator[Gateway]:
    config = {
        "http": {"port": 0},
        "deployments": [
            {"name": "Kill", "import_path": "gateway_apps:Echo3", "num_replicas": 2},
        ],
    }
    async with running_gateway(config) as gw:
        yield gw


async def replicas(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = (await client.get("/-/replicas")).json()["deployments"]["Kill"][
        "replicas"
    ]
    return out


async def test_sigkill_fails_only_in_flight_requests_and_pool_recovers(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as client:
        doomed = asyncio.ensure_future(
            client.get("/slow", params={"s": "30"}, headers={MODEL: "victim"})
        )
        victim: dict[str, Any] = {}

        async def victim_busy() -> bool:
            for rep in await replicas(client):
                if rep["in_flight"] == 1:
                    victim.update(rep)
                    return True
            return False

        await wait_until(within_s=30.0, check=victim_busy, what="slow request in flight")
        # A request without a model id goes to the less loaded replica: the other one.
        survivor = asyncio.ensure_future(client.get("/slow", params={"s": "1"}))

        async def both_busy() -> bool:
            return sum(r["in_flight"] for r in await replicas(client)) == 2

        await wait_until(within_s=30.0, check=both_busy, what="second request in flight")
        os.kill(victim["pid"], signal.SIGKILL)

        r = await doomed
        assert r.status_code == 502
        assert r.json()["error"]["code"] == "replica_died"
        assert r.headers["x-muxgate-replica"] == victim["id"]
        ok = await survivor
        assert ok.status_code == 200
        assert ok.headers["x-muxgate-replica"] != victim["id"]

        async def replaced() -> bool:
            reps = await replicas(client)
            return (
                len(reps) == 2
                and all(rep["state"] == "running" for rep in reps)
                and victim["id"] not in {rep["id"] for rep in reps}
            )

        await wait_until(within_s=30.0, check=replaced, what="pool back to 2 running replicas")
        # The log says how it died (the connection's close could not).
        said = f"replica {victim['id']} was killed by SIGKILL (signal 9)"
        await wait_until(
            lambda: any(r.getMessage().startswith(said) for r in caplog.records),
            what="the log line saying how the replica died",
        )
        assert (await client.get("/-/healthz")).status_code == 200
        served = {(await client.get("/", headers={MODEL: f"m{i}"})).status_code for i in range(10)}
        assert served == {200}
        metrics = (await client.get("/-/metrics")).text
        assert 'muxgate_requests_total{deployment="Kill",status="502"} 1.0' in metrics


async def test_scale_down_drains_and_scale_up_starts(gateway: Gateway) -> None:
    pool = gateway.pools["Kill"]
    async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as client:
        await wait_until(
            within_s=30.0, check=lambda: _true(pool.running == 2), what="two running replicas"
        )
        slow = asyncio.ensure_future(client.get("/slow", params={"s": "1"}, headers={MODEL: "x"}))

        async def in_flight() -> bool:
            return sum(r["in_flight"] for r in await replicas(client)) == 1

        await wait_until(within_s=30.0, check=in_flight, what="request in flight")
        pool.set_target(1)
        # The drained replica leaves the ring at once but finishes what it has.
        r = await slow
        assert r.status_code == 200

        async def one_left() -> bool:
            reps = await replicas(client)
            return len(reps) == 1 and reps[0]["state"] == "running"

        await wait_until(within_s=30.0, check=one_left, what="scale down to 1")
        assert "target=1" in repr(pool)
        pool.set_target(2)

        async def two_again() -> bool:
            reps = await replicas(client)
            return len(reps) == 2 and all(rep["state"] == "running" for rep in reps)

        await wait_until(within_s=30.0, check=two_again, what="scale up to 2")


async def _true(value: bool) -> bool:
    return value
