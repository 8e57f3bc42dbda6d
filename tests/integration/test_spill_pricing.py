"""Priced spills under concurrency, with real replicas and real torch models.

Two replicas of ``mlp_apps:Mlps`` (~4 MB MLPs, two models each: a load
costs several calls), eight models with Zipf(1.1) popularity, eight
concurrent clients replaying one seeded id sequence. Three deployments in one
gateway, replayed one after the other: ``max_ongoing_requests: 100``
(holders are never full: no spills), the default routing at
``max_ongoing_requests: 3``, and the same with ``routing.spill:
bounded_load`` (spill whenever every holder is full, the rule before
pricing). The default must load no more often than the no-spill run, while
the bounded-load rule shows that the scenario does make holders full.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from apps.mlp_apps import write_mlps
from gateway_harness import MODEL, running_gateway
from prometheus_text import only, parse_samples

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

MODELS = [str(i) for i in range(1, 9)]
REQUESTS = 400
CLIENTS = 8


def zipf_ids(n: int, count: int, s: float, seed: int) -> list[str]:
    rng = random.Random(seed)
    cumulative: list[float] = []
    total = 0.0
    for rank in range(1, n + 1):
        total += rank**-s
        cumulative.append(total)
    return [MODELS[bisect.bisect_left(cumulative, rng.random() * total)] for _ in range(count)]


RUNS = {
    # holders are never full: no spills, the reference
    "NoSpill": {"max_ongoing_requests": 100},
    # the default routing, holders full often
    "Priced": {"max_ongoing_requests": 3},
    # the rule before pricing: spill whenever every holder is full
    "Bounded": {"max_ongoing_requests": 3, "routing": {"spill": "bounded_load"}},
}


async def replay(client: httpx.AsyncClient, prefix: str, ids: list[str]) -> None:
    queue: Iterator[str] = iter(ids)

    async def worker() -> None:
        for model_id in queue:  # shared: each id is sent once
            r = await client.post(prefix, headers={MODEL: model_id})
            assert r.status_code == 200, r.text

    async with anyio.create_task_group() as tg:
        for _ in range(CLIENTS):
            tg.start_soon(worker)


async def test_priced_spills_load_no_more_than_no_spills(tmp_path: Path) -> None:
    write_mlps(tmp_path, MODELS)
    deployments = [
        {
            "name": name,
            "import_path": "mlp_apps:Mlps",
            "init_kwargs": {"model_root": str(tmp_path)},
            "route_prefix": f"/{name.lower()}",
            "num_replicas": 2,
            **settings,
        }
        for name, settings in RUNS.items()
    ]
    ids = zipf_ids(len(MODELS), REQUESTS, 1.1, seed=7)
    config = {"http": {"port": 0}, "deployments": deployments}
    async with (
        running_gateway(config) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=30) as client,
    ):
        for name in RUNS:  # one after the other: they share the cores
            await replay(client, f"/{name.lower()}", ids)
        samples = parse_samples((await client.get("/-/metrics")).text)
    loads = {name: 0.0 for name in RUNS}
    for labels, value in only(samples, "muxgate_model_loads_total").items():
        loads[dict(labels)["deployment"]] += value
    spills = sum(only(samples, "muxgate_spillovers_total").values())
    # Closed-loop interleaving moves one config's load count between runs:
    # five runs of NoSpill measured 87 to 98 loads (about +-6 %), so the
    # margin is 20 %. The bounded-load rule loaded 39 % and 65 % more than no
    # spills in the same measurement, so the check tells a rule that buys
    # copies from one that does not.
    print(f"loads {loads}, spills {spills}")
    assert spills > 0 and loads["Bounded"] > 1.2 * loads["NoSpill"], loads
    assert loads["Priced"] <= 1.2 * loads["NoSpill"], loads
