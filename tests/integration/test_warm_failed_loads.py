"""A model whose load failed is not warmed: a request for a model id that
is not in storage gets its 404, and warming does not load that id again
(real replica processes, real torch files through ``muxgate.backends``:
``observability_apps:Observed``).

The failing request wakes the deployment from zero, the moment warming
loads the hottest models the replica does not hold: the failed id was the
hottest, so without ``FailedLoads`` the replica loaded it a second time
right after the 404 (and failed again). ``s`` is asked for before, so it
ranks just below the failed id: once the replica holds ``s``, warming has
passed the failed id's place in its plan.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from apps.observability_apps import write_models
from gateway_harness import MODEL, running_gateway
from waiting import wait_until

from muxgate.gateway._serve import Gateway

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[tuple[Gateway, Path]]:
    root = tmp_path / "models"
    write_models(root, ["s"])
    config = {
        "http": {"port": 0},
        "deployments": [
            {
                "name": "Zero",
                "import_path": "observability_apps:Observed",
                "init_kwargs": {"model_root": root.as_uri()},
                "route_prefix": "/zero",
                "autoscaling": {
                    "min_replicas": 0,
                    "max_replicas": 1,
                    "initial_replicas": 0,
                    "downscale_delay_s": 0.5,
                    # long enough for the warming after a wake to end first
                    "downscale_to_zero_delay_s": 2.0,
                    "metrics_interval_s": 0.1,
                    "look_back_period_s": 0.3,
                },
            }
        ],
    }
    async with running_gateway(config) as gw:
        yield gw, root


def loads(snap: dict[str, Any], replica_id: str, model_id: str) -> list[str]:
    """The kinds of ``model_id``'s load events on ``replica_id``, oldest first."""
    return [
        e["kind"]
        for e in snap["events"]
        if e["replica"] == replica_id and e["model"] == model_id and e["kind"].startswith("load")
    ]


async def test_a_failed_load_is_not_warmed_right_after(gateway: tuple[Gateway, Path]) -> None:
    gw, root = gateway
    pool = gw.pools["Zero"]
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:

        async def view() -> dict[str, Any]:
            r = await client.get("/-/replicas")
            assert r.status_code == 200
            body: dict[str, Any] = r.json()["deployments"]["Zero"]
            return body

        r = await client.post("/zero", headers={MODEL: "s"})
        assert r.status_code == 200, r.text
        await asyncio.wait_for(pool.wait_for(lambda: pool.target == 0 and not pool.replicas), 30)

        # wakes a new replica: the 404, once the load failed
        r = await client.post("/zero", headers={MODEL: "77"})
        assert (r.status_code, r.json()["error"]["code"]) == (404, "model_not_found"), r.text
        replica_id = r.headers["x-muxgate-replica"]
        assert "77" in pool.failed_loads

        async def warmed() -> dict[str, Any] | None:
            # s's load event comes with a pong after every event before it
            snap = await view()
            return snap if loads(snap, replica_id, "s") == ["load"] else None

        snap = await wait_until(warmed, within_s=30, what="s warmed on the woken replica")
        # the request's load failed once; warming did not try it again
        assert loads(snap, replica_id, "77") == ["load_failed"]
        # Nothing of 77 on the replica. (It may already be going back to zero,
        # its models unloading.)
        for rep in snap["replicas"]:
            assert "77" not in rep["models"] and "77" not in rep["loading"], rep

        # 77 in storage now: a request loads it, and the failure is cleared
        write_models(root, ["77"])
        r = await client.post("/zero", headers={MODEL: "77"})
        assert r.status_code == 200, r.text
        assert "77" not in pool.failed_loads


async def test_a_warm_that_fails_is_skipped_and_warming_goes_on(
    gateway: tuple[Gateway, Path],
) -> None:
    """A model that loaded before, then left storage: the gateway knows no
    failure of it, so the warm set after zero still names it, first; its
    warm fails and the next model is warmed (a failed warm answered "not
    loaded", which the gateway reads as a full cache, and warming stopped)."""
    gw, root = gateway
    pool = gw.pools["Zero"]
    write_models(root, ["gone", "w"])
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        # s, then gone twice: gone ranks first, s second
        for model_id in ("s", "gone", "gone"):
            r = await client.post("/zero", headers={MODEL: model_id})
            assert r.status_code == 200, r.text
        await asyncio.wait_for(pool.wait_for(lambda: pool.target == 0 and not pool.replicas), 30)
        (root / "gone" / "model.pt").unlink()

        r = await client.post("/zero", headers={MODEL: "w"})  # wakes a new replica
        assert r.status_code == 200, r.text
        replica_id = r.headers["x-muxgate-replica"]

        async def warmed() -> dict[str, Any] | None:
            r = await client.get("/-/replicas")
            snap: dict[str, Any] = r.json()["deployments"]["Zero"]
            return snap if loads(snap, replica_id, "s") == ["load"] else None

        snap = await wait_until(warmed, within_s=30, what="s warmed after gone failed")
        assert loads(snap, replica_id, "gone") == ["load_failed"]
        assert loads(snap, replica_id, "w") == ["load"]
        # (From the events, not the replica's model list: the replica may
        # already be going back to zero, its models unloading.)
        # the failed warm counts against gone as a failed request's load does
        assert "gone" in pool.failed_loads and "s" not in pool.failed_loads
