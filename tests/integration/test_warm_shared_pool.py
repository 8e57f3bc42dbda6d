"""Warming from the requests the replicas report (``Pong.model_requests``),
with real replica processes: traffic that reached the pool through another
gateway (here a second connection to the replica, as a second gateway
has) decides what a joining replica warms, though this gateway routed none
of it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from apps.warm_apps import write_sized
from gateway_harness import running_gateway
from waiting import wait_until

from muxgate.gateway._connection import ReplicaConnection
from muxgate.gateway._serve import Gateway
from muxgate.replicas._protocol import HttpRequest

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

MODELS = [f"s-{i}" for i in range(16)]


@pytest.fixture
async def gateway(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    root = tmp_path_factory.mktemp("shared")
    write_sized(root, dict.fromkeys(MODELS, 8))
    config = {
        "http": {"port": 0},
        "deployments": [
            {
                "name": "Shared",
                "import_path": "warm_apps:Sized",
                "init_kwargs": {"model_root": str(root)},
                "route_prefix": "/shared",
                "num_replicas": 1,
            }
        ],
    }
    async with running_gateway(config) as gw:
        yield gw


async def test_a_joining_replica_warms_what_another_gateway_asked_for(gateway: Gateway) -> None:
    pool = gateway.pools["Shared"]
    await asyncio.wait_for(pool.wait_for(lambda: pool.running == 1), 30)
    (first,) = pool.replicas
    assert first.process is not None
    other = await ReplicaConnection.connect(first.process.address)  # "another gateway"
    try:
        http = HttpRequest(method="POST", path="/", query="", headers=[], body=b"")
        for model_id in MODELS:
            reply = await other.call(request_id=f"other-{model_id}", model_id=model_id, http=http)
            assert reply.error is None, reply.error
        pong = await other.ping()
        assert pong.model_requests == dict.fromkeys(sorted(MODELS), 1)
    finally:
        await other.aclose()
    # this gateway routed none of them; the replica's pongs told it
    assert not pool.router.popularity.top(1)
    reported = pool._reports.requested  # what the pool warms by
    await wait_until(
        lambda: all(reported.score(m) > 0 for m in MODELS), what="the replica's counts reported"
    )

    pool.set_target(2)
    await asyncio.wait_for(pool.wait_for(lambda: pool.running == 2), 30)
    (joined,) = [r for r in pool.targets if r != first.id]
    moved = [m for m in MODELS if pool.router.preference_list(m)[0] == joined]
    assert moved, "the ring moved no model to the new replica"

    async def warmed() -> bool:
        async with httpx.AsyncClient(base_url=gateway.url) as client:
            body = (await client.get("/-/replicas")).json()["deployments"]["Shared"]
        reps = {rep["id"]: rep for rep in body["replicas"]}
        return set(reps[joined]["models"]) == set(moved)

    await wait_until(warmed, within_s=30, what="the moved models warmed on the new replica")
