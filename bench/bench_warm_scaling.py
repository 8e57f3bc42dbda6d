"""What a scale step costs in client-visible model loads, with and without
warming (the warm handoff on ring changes).

Closed loop: ``--clients`` (8) clients send requests over ``--models`` (50)
real torch models with Zipf(1.1) popularity (``--app mlps``:
``tests/apps/mlp_apps.py`` ``Mlps``, ~4 MB each, two per replica by count;
``--app sized``: ``warm_apps.py`` ``Sized``, 1 MB each, no count limit;
``--app pool``: ``Sized`` with ``max_bytes_per_replica`` of
``--budget-models`` (30) models: the working set fits the pool of two
replicas but not one replica, where a scale step moves models between
replicas that keep them), to a deployment of fixed size.
Three windows of ``--window`` seconds (30) each, back to back: steady with
2 replicas; from ``pool.set_target(3)`` on (the third replica's start
included); from ``pool.set_target(2)`` on (the handover, if any,
included); a window whose step has not finished by its end goes on until
it has. For each window: requests, the client-visible loads
(``muxgate_cache_misses_total``: requests that waited for a load; warming
loads are not counted there), every load (``muxgate_model_loads_total``,
the warming ones included) and p99 latency.

``warming: off`` replaces the pool's warm handoff with nothing (the gateway
before it); ``on`` is the default.

    flock /work/wt/bench.lock .venv/bin/python bench/bench_warm_scaling.py

Results: docs/benchmarks.md ("Warm handoff").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import random
import sys
import tempfile
import time
from collections.abc import Awaitable
from typing import Any
from unittest import mock

import httpx
from _common import percentile, print_machine

HERE = os.path.dirname(os.path.abspath(__file__))
APPS = os.path.join(HERE, "..", "tests", "apps")
sys.path.insert(0, APPS)

from mlp_apps import write_mlps  # noqa: E402
from warm_apps import linear_bytes, write_sized  # noqa: E402

import muxgate.gateway._pool_warming as pool_warming  # noqa: E402
from muxgate.gateway._config import parse_config  # noqa: E402
from muxgate.gateway._serve import start_gateway  # noqa: E402

MODEL = "serve_multiplexed_model_id"
#: ``mlps``: two 4 MB models per replica (loads dominate); ``sized``: 1 MB
#: models and no count limit (the working set fits one replica); ``pool``:
#: the same under a byte budget (it fits the pool, not one replica)
APPS_BY_NAME = {"mlps": "mlp_apps:Mlps", "sized": "warm_apps:Sized", "pool": "warm_apps:Sized"}
#: the width of the ``sized`` and ``pool`` models (about 1 MB each)
WIDTH = 512
#: the longest a window waits past ``--window`` for its scale step to finish
STEP_TIMEOUT_S = 120.0


def total(text: str, name: str = "muxgate_cache_misses_total") -> float:
    """The sum of a counter's samples in a scrape."""
    out = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{"):
            out += float(line.rsplit(" ", 1)[1])
    return out


class Load:
    """The closed loop: latencies of the requests finished since ``mark()``."""

    def __init__(self, url: str, models: list[str], clients: int, seed: int) -> None:
        self.url, self.models, self.clients = url, models, clients
        weights = [1 / (i + 1) ** 1.1 for i in range(len(models))]
        self.rng = random.Random(seed)
        self.cum = list(itertools.accumulate(weights))
        self.latencies: list[float] = []
        self.errors = 0
        self.stop = False

    def pick(self) -> str:
        return self.rng.choices(self.models, cum_weights=self.cum)[0]

    async def client(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=60) as c:
            while not self.stop:
                started = time.perf_counter()
                r = await c.post("/", headers={MODEL: self.pick()})
                self.latencies.append(time.perf_counter() - started)
                if r.status_code != 200:
                    self.errors += 1

    def mark(self) -> list[float]:
        done, self.latencies = self.latencies, []
        return done


async def held(admin: httpx.AsyncClient) -> dict[str, int]:
    """Models each replica holds (what a scale-down hands over, and where to)."""
    body = (await admin.get("/-/replicas")).json()["deployments"]["Mlps"]
    return {rep["id"]: len(rep["models"]) for rep in body["replicas"]}


async def window(
    name: str,
    load: Load,
    admin: httpx.AsyncClient,
    seconds: float,
    step: Awaitable[None] | None = None,
) -> dict[str, Any]:
    """One measured window of ``seconds``; it goes on until ``step`` (the
    scale step it measures) is done, so that a short ``--window`` on a slow
    host still holds the whole step."""
    before = (await admin.get("/-/metrics")).text
    load.mark()
    await asyncio.sleep(seconds)  # the measured window, not synchronisation
    if step is not None:
        await asyncio.wait_for(step, STEP_TIMEOUT_S)
    lat = load.mark()
    after = (await admin.get("/-/metrics")).text
    row = {
        "window": name,
        "requests": len(lat),
        "loads": int(total(after) - total(before)),
        # every load, the warming ones included
        "all_loads": int(
            total(after, "muxgate_model_loads_total") - total(before, "muxgate_model_loads_total")
        ),
        "p99_ms": round(1e3 * percentile(lat, 0.99), 1) if lat else None,
    }
    print(row, flush=True)
    return row


async def run(warming: bool, args: argparse.Namespace, root: str) -> list[dict[str, Any]]:
    patches = contextlib.ExitStack()
    if not warming:

        async def nothing(*_: Any, **__: Any) -> None:
            return None

        # No warming on join, and no hand-over: a leaving replica drains at once.
        patches.enter_context(mock.patch.object(pool_warming, "warm_moved_home", nothing))
        patches.enter_context(mock.patch.object(pool_warming, "hand_over", nothing))
    models = [f"m{i:02d}" for i in range(args.models)]
    deployment: dict[str, Any] = {
        "name": "Mlps",
        "import_path": APPS_BY_NAME[args.app],
        "init_kwargs": {"model_root": root},
        "num_replicas": 2,
        "num_cpus": 0.5,
    }
    if args.app == "pool":
        deployment["max_bytes_per_replica"] = args.budget_models * linear_bytes(WIDTH)
    config = parse_config({"http": {"port": 0}, "deployments": [deployment]}, base_dir=APPS)
    rows = []
    try:
        async with (
            start_gateway(config) as gw,
            httpx.AsyncClient(base_url=gw.url, timeout=60) as admin,
        ):
            pool = gw.pools["Mlps"]
            load = Load(gw.url, models, args.clients, seed=7)
            tasks = [asyncio.create_task(load.client()) for _ in range(args.clients)]
            await asyncio.sleep(args.window / 3)  # warm-up, not measured
            rows.append(await window("steady, 2 replicas", load, admin, args.window))
            pool.set_target(3)
            three = pool.wait_for(lambda: pool.running == 3)
            rows.append(await window("after 2 -> 3", load, admin, args.window, three))
            print("held before 3 -> 2:", await held(admin), flush=True)
            pool.set_target(2)
            two = pool.wait_for(lambda: pool.running == 2)
            rows.append(await window("after 3 -> 2", load, admin, args.window, two))
            load.stop = True
            await asyncio.gather(*tasks)
            print(f"errors: {load.errors}")
    finally:
        patches.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--window", type=float, default=30.0)
    parser.add_argument("--only", choices=["on", "off"])
    parser.add_argument("--app", choices=sorted(APPS_BY_NAME), default="mlps")
    parser.add_argument(
        "--budget-models", type=int, default=30, help="--app pool: models per replica's budget"
    )
    args = parser.parse_args()
    print_machine()
    with tempfile.TemporaryDirectory() as root:
        ids = [f"m{i:02d}" for i in range(args.models)]
        if args.app == "mlps":
            write_mlps(root, ids)
        else:
            write_sized(root, dict.fromkeys(ids, WIDTH))
        for warming in (False, True):
            if args.only and args.only != ("on" if warming else "off"):
                continue
            print(f"warming: {'on' if warming else 'off'}", flush=True)
            asyncio.run(run(warming, args, root))


if __name__ == "__main__":
    main()
