"""``routing.spill: never`` with real replicas: a concurrent burst on one
model loads it once.

Two deployments of ``gateway_apps:Echo2`` in one gateway, two replicas each,
``max_ongoing_requests: 2``, every request held in flight for a moment
(``/slow``). A burst of twelve concurrent requests for one model: under
``never`` all of them are served by the one replica that loaded it (the rest
wait for its slots); under ``bounded_load`` the same burst loads it on both
replicas, so the burst does make the holder full.
"""

from __future__ import annotations

import anyio
import httpx
import pytest
from gateway_harness import MODEL, running_gateway

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

BURST = 12

RULES = {"Never": "never", "Bounded": "bounded_load"}


async def burst(client: httpx.AsyncClient, prefix: str) -> set[str]:
    """The replicas that answered a burst of concurrent requests for one model."""
    replicas: set[str] = set()

    async def one() -> None:
        r = await client.post(f"{prefix}/slow", params={"s": "0.2"}, headers={MODEL: "m"})
        assert r.status_code == 200, r.text
        replicas.add(r.json()["replica"])

    async with anyio.create_task_group() as tg:
        for _ in range(BURST):
            tg.start_soon(one)
    return replicas


async def test_a_burst_on_one_model_loads_it_once_under_never() -> None:
    deployments = [
        {
            "name": name,
            "import_path": "gateway_apps:Echo2",
            "route_prefix": f"/{name.lower()}",
            "num_replicas": 2,
            "max_ongoing_requests": 2,
            "routing": {"spill": rule},
        }
        for name, rule in RULES.items()
    ]
    config = {"http": {"port": 0}, "deployments": deployments}
    async with (
        running_gateway(config) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=30) as client,
    ):
        # Each replica that answered loaded the model (Echo2 keeps it: one
        # model, two slots), so replicas answering = loads.
        assert len(await burst(client, "/never")) == 1
        assert len(await burst(client, "/bounded")) == 2
