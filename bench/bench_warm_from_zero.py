"""Scale from zero with memory: the waking request's latency, and how soon
the hottest models of the warm set are loaded after it.

One deployment (``tests/apps/warm_apps.py`` ``Sized``, ``--width`` 1024:
4 MB torch models, no count limit), autoscaled between 0 and 1 replica.
Each round: ``--requests`` (200) requests with Zipf(1.1) popularity over
``--models`` (20) models build the warm set; the deployment scales to zero
(the drained replica gone); then one request for the hottest model wakes it.
Measured: that request's latency (replica start included), and the time from
its response until each of the ``--k`` (8) hottest other models is loaded
(from the replica's load events: wall-clock end of each load), against the
target ``k x (mean load time) + 1 s``.

``warming: off`` replaces the pool's warm-after-zero with nothing (the
waking request is served the same way); rounds alternate off and on.

    flock /work/wt/bench.lock .venv/bin/python bench/bench_warm_from_zero.py

Results: docs/benchmarks.md ("Warm handoff").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import sys
import tempfile
import time
from typing import Any
from unittest import mock

import httpx
from _common import print_machine

HERE = os.path.dirname(os.path.abspath(__file__))
APPS = os.path.join(HERE, "..", "tests", "apps")
sys.path.insert(0, APPS)

from warm_apps import write_sized  # noqa: E402

import muxgate.gateway._pool_warming as pool_warming  # noqa: E402
from muxgate.gateway._config import parse_config  # noqa: E402
from muxgate.gateway._serve import start_gateway  # noqa: E402

MODEL = "serve_multiplexed_model_id"
NAME = "Zero"


def config(root: str) -> Any:
    return parse_config(
        {
            "http": {"port": 0},
            "deployments": [
                {
                    "name": NAME,
                    "import_path": "warm_apps:Sized",
                    "init_kwargs": {"model_root": root},
                    "num_cpus": 1,
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
        },
        base_dir=APPS,
    )


async def events(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    body = (await client.get("/-/replicas")).json()["deployments"][NAME]
    return list(body["events"])


async def one_round(
    warming: bool, args: argparse.Namespace, root: str, seed: int
) -> dict[str, Any]:
    models = [f"z{i:02d}" for i in range(args.models)]
    weights = [1 / (i + 1) ** 1.1 for i in range(len(models))]
    rng = random.Random(seed)
    patches = contextlib.ExitStack()
    if not warming:

        async def nothing(*_: Any, **__: Any) -> None:
            return None

        patches.enter_context(mock.patch.object(pool_warming, "warm_after_zero", nothing))
    with patches:
        async with (
            start_gateway(config(root)) as gw,
            httpx.AsyncClient(base_url=gw.url, timeout=60) as client,
        ):
            pool = gw.pools[NAME]
            for model_id in rng.choices(models, weights, k=args.requests):
                r = await client.post("/", headers={MODEL: model_id})
                assert r.status_code == 200, r.text
            hottest = [m for m, _ in pool.router.popularity.top(args.k + 1)]
            waker, wanted = hottest[0], hottest[1:]
            await asyncio.wait_for(
                pool.wait_for(lambda: pool.target == 0 and not pool.replicas), 60
            )
            started = time.perf_counter()
            r = await client.post("/", headers={MODEL: waker})
            latency = time.perf_counter() - started
            answered_at = time.time()
            assert r.status_code == 200, r.text
            replica = r.headers["x-muxgate-replica"]
            loads: dict[str, dict[str, Any]] = {}
            deadline = time.monotonic() + (30 if warming else 3)
            while time.monotonic() < deadline and not set(wanted) <= set(loads):
                await asyncio.sleep(0.2)  # polling the replica's reports, not synchronisation
                for e in await events(client):
                    if e["replica"] == replica and e["kind"] == "load":
                        loads.setdefault(e["model"], e)
            load_s = statistics.mean(e["duration_ms"] / 1e3 for e in loads.values())
            done = [loads[m]["time"] - answered_at for m in wanted if m in loads]
            row = {
                "warming": "on" if warming else "off",
                "waking_ms": round(1e3 * latency, 1),
                "k": len(wanted),
                "k_loaded": len(done),
                "k_loaded_after_s": round(max(done), 3) if len(done) == len(wanted) else None,
                "load_ms": round(1e3 * load_s, 1),
                "target_s": round(len(wanted) * load_s + 1.0, 3),
            }
            print(row, flush=True)
            return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=20)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print_machine()
    with tempfile.TemporaryDirectory() as root:
        write_sized(root, {f"z{i:02d}": args.width for i in range(args.models)})
        rows = [
            asyncio.run(one_round(warming, args, root, seed=i))
            for i in range(args.rounds)
            for warming in (False, True)
        ]
    for mode in ("off", "on"):
        waking = [r["waking_ms"] for r in rows if r["warming"] == mode]
        print(f"{mode}: waking request median {statistics.median(waking):.0f} ms {waking}")


if __name__ == "__main__":
    main()
