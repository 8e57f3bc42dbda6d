"""Priced spills under concurrency, with real replicas and real torch models.

Two replicas of ``mlp_apps:Mlps`` (~4 MB MLPs, two models each: a load
costs several calls), eight models with Zipf(1.1) popularity, eight
concurrent clients replaying one seeded id sequence. Three deployments in one
gateway, replayed one after the other: ``max_ongoing_requests: 100``
(holders are never full: no spills), the default routing at
``max_ongoing_requests: 3``, and the same with ``routing.spill:
bounded_load`` (spill whenever every holder is full, the rule before
pricing). The default must load no more often than the no-spill run, in a
run where the bounded-load rule shows that the scenario did make holders
full (and so that the check tells a rule that buys copies from one that
does not).
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

# up to ATTEMPTS measurements of ~10 s each on a quiet host, a minute on a busy one
pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.timeout(400)]

MODELS = [str(i) for i in range(1, 9)]
REQUESTS = 400
CLIENTS = 8
#: measurements at most (see the test)
ATTEMPTS = 3


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


async def measure(model_root: Path, ids: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    """One gateway, fresh replicas: each config replays ``ids`` in turn; the
    loads and spills per config."""
    deployments = [
        {
            "name": name,
            "import_path": "mlp_apps:Mlps",
            "init_kwargs": {"model_root": str(model_root)},
            "route_prefix": f"/{name.lower()}",
            "num_replicas": 2,
            **settings,
        }
        for name, settings in RUNS.items()
    ]
    config = {"http": {"port": 0}, "deployments": deployments}
    async with (
        running_gateway(config) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=30) as client,
    ):
        for name in RUNS:  # one after the other: they share the cores
            await replay(client, f"/{name.lower()}", ids)
        samples = parse_samples((await client.get("/-/metrics")).text)
    loads = dict.fromkeys(RUNS, 0.0)
    for labels, value in only(samples, "muxgate_model_loads_total").items():
        loads[dict(labels)["deployment"]] += value
    spills = dict.fromkeys(RUNS, 0.0)
    for labels, value in only(samples, "muxgate_spillovers_total").items():
        spills[dict(labels)["deployment"]] += value
    print(f"loads {loads}, spills {spills}")
    return loads, spills


async def test_priced_spills_load_no_more_than_no_spills(tmp_path: Path) -> None:
    write_mlps(tmp_path, MODELS)
    ids = zipf_ids(len(MODELS), REQUESTS, 1.1, seed=7)
    # Closed-loop interleaving moves one config's load count between runs:
    # NoSpill measured 87 to 111 loads (about +-10 %), so the margin is 20 %.
    # The bounded-load rule is the control: where it loads more than that
    # margin above NoSpill, holders were full often enough that a rule
    # buying copies whenever they are shows, and the default's check means
    # something. How full holders get depends on the host: beside two busy
    # loops on the 2 cores (the gateway and the clients share one event
    # loop), the two spilling rules spilled 9-22 times together (38 on a
    # quiet host), bounded load loaded 1.08-1.47 x NoSpill (1.24-1.70 x
    # quiet), the default 0.91-1.25 x (0.99-1.13 x quiet). So a measurement
    # counts only where the control shows the pressure, and the default
    # fails only if it is over the margin in two of them (a rule that buys
    # copies like bounded load is over it in nearly every one); with no
    # measurement showing the pressure in ATTEMPTS, the test skips, saying why.
    over: list[dict[str, float]] = []
    for _ in range(ATTEMPTS):
        loads, spills = await measure(tmp_path, ids)
        if not (spills["Bounded"] > 0 and loads["Bounded"] > 1.2 * loads["NoSpill"]):
            continue
        if loads["Priced"] <= 1.2 * loads["NoSpill"]:
            return
        over.append(loads)
        if len(over) == 2:
            break
    if over:
        assert len(over) < 2, f"the default loaded more than 1.2 x no spills twice: {over}"
        return  # once over, and no further measurement showed the pressure
    pytest.skip(
        f"holders were not full often enough to tell the rules apart in {ATTEMPTS} runs"
        f" (a busy host?): last loads {loads}, spills {spills}"
    )
