"""Warm handoff on ring changes, with real replica processes and torch
files (``warm_apps:Sized``): a replica that joins warms the recently
requested models whose home it became; a replica that is scaled down keeps
serving until the next homes of its recent models hold them, and a next
home that is full gives up spare copies for them, never a last copy."""

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
from muxgate.gateway._warmer import hand_over

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

MODELS = [f"h-{i}" for i in range(16)]
SPARE_MODELS = [f"s-{i}" for i in range(24)]
#: four models of width 8 a replica
SPARE_BUDGET = 4 * linear_bytes(8)


@pytest.fixture(scope="module")
async def gateway(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    root = tmp_path_factory.mktemp("handoff")
    write_sized(root, dict.fromkeys(MODELS + SPARE_MODELS, 8))
    config = {
        "http": {"port": 0},
        "deployments": [
            {
                "name": "Ring",
                "import_path": "warm_apps:Sized",
                "init_kwargs": {"model_root": str(root)},
                "route_prefix": "/ring",
                "num_replicas": 1,
            },
            {
                "name": "Spare",
                "import_path": "warm_apps:Sized",
                "init_kwargs": {"model_root": str(root)},
                "route_prefix": "/spare",
                "num_replicas": 3,
                "max_bytes_per_replica": SPARE_BUDGET,
                "num_cpus": 0.5,
            },
        ],
    }
    async with running_gateway(config) as gw:
        yield gw


async def replicas(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    body = (await client.get("/-/replicas")).json()["deployments"]["Ring"]
    return {rep["id"]: rep for rep in body["replicas"]}


async def test_a_joining_replica_warms_its_share_and_a_leaving_one_hands_over(
    gateway: Gateway,
) -> None:
    pool = gateway.pools["Ring"]
    await asyncio.wait_for(pool.wait_for(lambda: pool.running == 1), 30)
    (first,) = list(pool.targets)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        for model_id in MODELS:
            r = await client.post("/ring", headers={MODEL: model_id})
            assert r.status_code == 200, r.text

        pool.set_target(2)
        await asyncio.wait_for(pool.wait_for(lambda: pool.running == 2), 30)
        (joined,) = [r for r in pool.targets if r != first]
        moved = [m for m in MODELS if pool.router.preference_list(m)[0] == joined]
        assert moved, "the ring moved no model to the new replica"

        async def warmed() -> bool:
            reps = await replicas(client)
            return set(moved) <= set(reps[joined]["models"])

        await wait_until(warmed, within_s=30, what="the moved models warmed on the new replica")
        reps = await replicas(client)
        # only its share: the models whose home stayed are not loaded there
        assert set(reps[joined]["models"]) == set(moved)

        # and its share is served there without a new load. The replicas' own
        # event lists, asked directly: /-/replicas shows them a ping late.
        async def loads() -> list[tuple[str, int]]:
            return [
                (replica_id, event.seq)
                for replica_id in (first, joined)
                for event in (await pool.targets[replica_id].ping(events_after=0)).events
                if event.kind == "load"
            ]

        loads_before = await loads()
        for model_id in moved:
            r = await client.post("/ring", headers={MODEL: model_id})
            assert r.headers["x-muxgate-replica"] in (joined, first)
        assert await loads() == loads_before

        # The old holder lets go of the moved models: now each replica holds
        # only its own share, and the one that leaves has models the other lacks.
        for model_id in moved:
            reply = await pool.targets[first].control("unload", model_id)
            assert reply.error is None
        reps = await replicas(client)
        assert not set(moved) & set(reps[first]["models"])

        # Scale down: whichever replica leaves, the other holds all 16 before it goes.
        pool.set_target(1)
        await asyncio.wait_for(pool.wait_for(lambda: pool.running == 1), 60)
        (staying,) = list(pool.targets)
        reps = await replicas(client)
        assert set(MODELS) <= set(reps[staying]["models"])
        for model_id in MODELS:  # all hits: no load after the drain
            r = await client.post("/ring", headers={MODEL: model_id})
            assert r.status_code == 200
        events = (await client.get("/-/replicas")).json()["deployments"]["Ring"]["events"]
        drained_at = max(e["time"] for e in events if e["reason"] == "drain")
        assert not [e for e in events if e["kind"] == "load" and e["time"] > drained_at]


async def test_a_full_next_home_gives_up_spare_copies_never_a_last_copy(
    gateway: Gateway,
) -> None:
    pool = gateway.pools["Spare"]
    await asyncio.wait_for(pool.wait_for(lambda: pool.running == 3), 30)
    router = pool.router
    homes = {
        r: [m for m in SPARE_MODELS if router.preference_list(m)[0] == r][:2] for r in pool.targets
    }
    assert all(len(ms) == 2 for ms in homes.values()), homes
    leaving, *staying = sorted(pool.targets)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        for models in homes.values():  # requested once each: recently requested
            for model_id in models:
                r = await client.post("/spare", headers={MODEL: model_id})
                assert r.status_code == 200, r.text
    for home, models in homes.items():  # each held by its home only
        for model_id in models:
            for replica_id, conn in pool.targets.items():
                reply = await conn.control("load" if replica_id == home else "unload", model_id)
                assert reply.error is None, reply.error
    # Each staying replica fills its budget with spare copies of the other's models.
    for home in staying:
        (other,) = [r for r in staying if r != home]
        for model_id in homes[other]:
            reply = await pool.targets[home].control("load", model_id)
            assert reply.error is None, reply.error
    expected = {m: {leaving} for m in homes[leaving]}
    expected.update({m: set(staying) for r in staying for m in homes[r]})
    await wait_until(
        lambda: all(router.holders(m) == rs for m, rs in expected.items()),
        within_s=30,
        what="the router seeing the spare copies",
    )
    full = [(await pool.targets[r].ping()).state.models for r in staying]
    assert [len(models) for models in full] == [4, 4]

    await hand_over(
        pool.targets[leaving], leaving, router, pool.targets, load_time_s=5.0, loader=None
    )

    held = {r: set((await pool.targets[r].ping()).state.models) for r in staying}
    for model_id in homes[leaving]:  # each on its next home, which had no room
        nxt = next(r for r in router.preference_list(model_id) if r != leaving)
        assert model_id in held[nxt]
    for home in staying:  # every model of a staying replica kept its home copy
        assert set(homes[home]) <= held[home]
        assert len(held[home]) <= 4
    # what went were spare copies, as many as came in
    for home in staying:
        came = len(set(homes[leaving]) & held[home])
        (other,) = [r for r in staying if r != home]
        assert len(set(homes[other]) - held[home]) == came
