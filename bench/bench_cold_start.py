"""Cold start and scale-up reaction of an autoscaled deployment.

Each run starts a fresh gateway whose deployment (``tests/apps/cold_start_apps.py``
``Mlp``: a 3-layer torch MLP, weights loaded per model id from local files
through ``muxgate.backends``) has ``min_replicas: 0`` and no replica, then:

1. Cold start: one request; the time to its response is split into
   * activator: request sent -> the pool asks the launcher for a replica,
   * replica start: launcher call -> ``READY`` (process spawn, imports
     incl. torch, ``__init__``),
   * connect: ``READY`` -> handshake done, replica in the router,
   * model load: the replica's own ``model_load_seconds_sum``,
   * rest: routing, the call, the HTTP hops (total minus the above).
2. Scale-up reaction: with one replica running, a burst of ``--burst``
   requests that each stay in flight ``--hold`` s; the time from the burst's
   start until the autoscaler raises the target, until a second replica
   runs, and until ``max_replicas`` run.

Prints per-run rows and the median; bounded (``--runs`` x ~5 s).

    .venv/bin/python bench/bench_cold_start.py [--runs 5] [--hidden 1024]

``--mode spawn|fork-lazy|fork-warm|all`` (default all, interleaved run by
run): spawned replicas; replicas forked by the fork server, started with the
first replica (lazy) or with ``LocalLauncher.warm_up()`` right after the
gateway started (warm). ``scale_up_starts`` is the median launcher start
(call -> ``READY``) of the scale-up's replicas.

Result (2 cores, Intel Xeon, Python 3.11, ``--runs 3``, medians, ms):

    phase              spawn  fork-lazy  fork-warm
    total               1102       1281         94
    replica_start       1073       1218         26
    scale_up_2nd        1248        148        123
    scale_up_max (3)    1321        190        163
    scale_up_starts     1200         56         48

Forking cuts a replica start ~40x (1.1 s -> 26-56 ms: fork + ``__init__``);
from zero it helps only when the fork server is up before the first request
(fork-lazy pays the fork server's own torch import on the first start).

``--queue-compare`` measures instead what the pool's queue discipline does
under overload (``queue_affinity_wait_s: 0``, strict FIFO, against the
default cache-affine queue), on ``tests/apps/autoscale_apps.py`` ``SlowLoad``.

    .venv/bin/python bench/bench_cold_start.py --queue-compare --runs 3

Result (same machine, 3 seeds, medians): strict FIFO 78 req/s, 266 model
loads per 600 requests, p50 415 ms, p99 652 ms; cache-affine 108 req/s, 101
loads, p50 256 ms, p99 759 ms. The affine queue serves 38% more requests
with 62% fewer loads; the cost is a longer tail for requests of cold models,
which wait up to about one load time behind hits.

Result (2 cores, Intel Xeon, Python 3.11, 5 runs, 4.3 MB model, medians):
first response 1141 ms from zero = activator 3 ms + replica start 1094 ms
(spawn, imports incl. torch, ``__init__``) + connect 1 ms + model load 20 ms
+ routing and HTTP 10 ms. The process start is the cold start; trimming it
means a lighter import path or a pre-forked warm replica. Scale-up: the
autoscaler raised the target 56 ms after the burst began (upscale_delay 0,
0.1 s samples); the second replica ran after 2.1 s and the third after 2.3 s
(two torch processes starting at once on 2 cores take ~2 s each).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from typing import Any

import httpx
from _common import percentile, print_machine

HERE = os.path.dirname(os.path.abspath(__file__))
APPS = os.path.join(HERE, "..", "tests", "apps")
sys.path.insert(0, APPS)

from cold_start_apps import make_models  # noqa: E402

from muxgate.gateway._config import parse_config  # noqa: E402
from muxgate.gateway._serve import start_gateway  # noqa: E402
from muxgate.gateway.launchers.local import LocalLauncher  # noqa: E402

MODEL = "serve_multiplexed_model_id"


#: how replicas start: spawned, forked by a fork server started with the
#: first replica, or forked by one started (``warm_up()``) with the gateway
MODES = {
    "spawn": {"fork_server": False},
    "fork-lazy": {"fork_server": True},
    "fork-warm": {"fork_server": True},
}


class TimedLauncher(LocalLauncher):
    """A ``LocalLauncher`` that records when each start began and ended."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.starts: list[tuple[float, float]] = []

    async def start(self, spec: Any) -> Any:
        began = time.perf_counter()
        process = await super().start(spec)
        self.starts.append((began, time.perf_counter()))
        return process


async def one_run(
    args: argparse.Namespace, root: str, run: int, mode: str = "spawn"
) -> dict[str, float]:
    config = parse_config(
        {
            "http": {"port": 0},
            "deployments": [
                {
                    "name": "Mlp",
                    "import_path": "cold_start_apps:Mlp",
                    "init_kwargs": {"model_root": f"file://{root}", "hidden": args.hidden},
                    "max_ongoing_requests": 4,
                    "autoscaling": {
                        "min_replicas": 0,
                        "max_replicas": args.max_replicas,
                        "target_ongoing_requests": 2,
                        "upscale_delay_s": args.upscale_delay,
                        "downscale_delay_s": 60,
                        "metrics_interval_s": 0.1,
                        "look_back_period_s": 0.5,
                    },
                }
            ],
        },
        base_dir=APPS,
    )
    launcher = TimedLauncher(**MODES[mode])
    out: dict[str, float] = {}
    try:
        async with (
            start_gateway(config, launcher=launcher) as gw,
            httpx.AsyncClient(base_url=gw.url, timeout=60) as client,
        ):
            pool = gw.pools["Mlp"]
            if mode == "fork-warm":
                assert await launcher.warm_up(), launcher.fork_disabled_reason
            joined: list[float] = []

            async def watch_join() -> None:
                await pool.wait_for(lambda: pool.running >= 1)
                joined.append(time.perf_counter())

            watcher = asyncio.ensure_future(watch_join())
            sent = time.perf_counter()
            response = await client.get("/", headers={MODEL: f"m{run}"})
            done = time.perf_counter()
            response.raise_for_status()
            await watcher
            ((began, ready),) = launcher.starts
            (conn,) = pool.targets.values()
            counters = (await conn.ping()).counters
            load = counters.get("model_load_seconds_sum", 0.0)
            out = {
                "total": done - sent,
                "activator": began - sent,
                "replica_start": ready - began,
                "connect": joined[0] - ready,
                "model_load": load,
                "rest": (done - joined[0]) - load,
            }
            # Scale-up: a burst of requests that stay in flight.
            burst_at = time.perf_counter()
            burst = [
                asyncio.ensure_future(
                    client.get(
                        "/",
                        params={"sleep": str(args.hold)},
                        headers={MODEL: f"m{(run + i) % args.models}"},
                    )
                )
                for i in range(args.burst)
            ]
            async with asyncio.timeout(60):
                await pool.wait_for(lambda: pool.target >= 2)
                out["scale_up_decided"] = time.perf_counter() - burst_at
                await pool.wait_for(lambda: pool.running >= 2)
                out["scale_up_2nd"] = time.perf_counter() - burst_at
                await pool.wait_for(lambda: pool.running >= args.max_replicas)
                out["scale_up_max"] = time.perf_counter() - burst_at
            for r in await asyncio.gather(*burst):
                r.raise_for_status()
            # Replica start alone (launcher call -> READY) of the scale-up's starts.
            out["scale_up_starts"] = statistics.median(b - a for a, b in launcher.starts[1:])
            if mode != "spawn":
                assert launcher.fork_disabled_reason is None, launcher.fork_disabled_reason
    finally:
        await launcher.aclose()
    return out


async def queue_run(args: argparse.Namespace, wait: float | None, seed: int) -> dict[str, float]:
    """Overload 2 replicas of ``SlowLoad`` (0.2 s loads, 2 models each) with
    Zipf traffic over 8 models; return throughput, model loads and latency."""
    routing = {} if wait is None else {"queue_affinity_wait_s": wait}
    config = parse_config(
        {
            "http": {"port": 0},
            "deployments": [
                {
                    "name": "S",
                    "import_path": "autoscale_apps:SlowLoad",
                    "init_kwargs": {"load_s": 0.2, "serve_s": 0.01},
                    "num_replicas": 2,
                    "routing": routing,
                }
            ],
        },
        base_dir=APPS,
    )
    rng = random.Random(seed)
    models = [f"m{i}" for i in range(8)]
    ids = iter(rng.choices(models, [1 / (i + 1) for i in range(8)], k=args.queue_requests))
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=args.queue_clients)
    async with (
        start_gateway(config) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=60, limits=limits) as client,
    ):

        async def worker() -> None:
            for model in ids:
                t = time.perf_counter()
                r = await client.get("/", headers={MODEL: model})
                r.raise_for_status()
                latencies.append(time.perf_counter() - t)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.queue_clients)))
        elapsed = time.perf_counter() - started
        loads = 0.0
        for conn in gw.pools["S"].targets.values():
            loads += (await conn.ping()).counters.get("model_loads", 0.0)
    return {
        "req_per_s": len(latencies) / elapsed,
        "loads": loads,
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
    }


async def queue_compare(args: argparse.Namespace) -> None:
    rows: dict[str, list[dict[str, float]]] = {"fifo (wait 0)": [], "affine (default)": []}
    for seed in range(args.runs):
        for label, wait in (("fifo (wait 0)", 0.0), ("affine (default)", None)):
            row = await queue_run(args, wait, seed)
            rows[label].append(row)
            print(f"seed {seed} {label}: " + " ".join(f"{k}={v:.0f}" for k, v in row.items()))
    print(
        f"\ngateway queue under overload: 2 replicas x 4 slots, 2 models each, 0.2 s loads,"
        f" 8 Zipf models, {args.queue_clients} clients x {args.queue_requests} requests,"
        f" {args.runs} seeds (medians)"
    )
    print(f"{'queue':<18}{'req/s':>8}{'loads':>8}{'p50 ms':>9}{'p99 ms':>9}")
    for label, runs in rows.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(
            f"{label:<18}{med['req_per_s']:>8.0f}{med['loads']:>8.0f}"
            f"{med['p50_ms']:>9.0f}{med['p99_ms']:>9.0f}"
        )


def prepare(root: str, ids: list[str], hidden: int) -> int:
    """Write the model files; return one file's size."""
    make_models(root, ids, hidden)
    return os.path.getsize(os.path.join(root, ids[0], "model.pt"))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=1024, help="MLP width (1024: ~4.3 MB)")
    parser.add_argument("--burst", type=int, default=24)
    parser.add_argument("--hold", type=float, default=1.0, help="seconds each burst request holds")
    parser.add_argument("--max-replicas", type=int, default=3)
    parser.add_argument("--upscale-delay", type=float, default=0.0)
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument(
        "--mode",
        choices=[*MODES, "all"],
        default="all",
        help="spawn replicas, fork them (fork server started with the first replica),"
        " or fork them from a fork server started with the gateway",
    )
    parser.add_argument(
        "--queue-compare",
        action="store_true",
        help="instead: strict FIFO vs cache-affine gateway queue under overload",
    )
    parser.add_argument("--queue-clients", type=int, default=32)
    parser.add_argument("--queue-requests", type=int, default=600)
    args = parser.parse_args()
    if args.queue_compare:
        await queue_compare(args)
        print()
        print_machine()
        return

    modes = list(MODES) if args.mode == "all" else [args.mode]
    with tempfile.TemporaryDirectory(prefix="muxgate-bench-") as root:
        ids = [f"m{i}" for i in range(max(args.models, args.runs))]
        size = prepare(root, ids, args.hidden)
        rows: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
        # Modes interleaved run by run: drift of the machine hits each alike.
        for run in range(args.runs):
            for mode in modes:
                rows[mode].append(await one_run(args, root, run, mode))
                print(
                    f"run {run} {mode}: "
                    + " ".join(f"{k}={v * 1000:.0f}ms" for k, v in rows[mode][-1].items())
                )
    keys = list(rows[modes[0]][0])
    print(
        f"\ncold start of an autoscaled deployment (min 0), model file {size / 1e6:.1f} MB,"
        f" {args.runs} runs per mode; scale-up: burst of {args.burst} x {args.hold:g} s,"
        f" target 2/replica, upscale_delay_s={args.upscale_delay:g}, max {args.max_replicas}"
    )
    print("median ms (min-max)")
    print(f"{'phase':<18}" + "".join(f"{m:>20}" for m in modes))
    for key in keys:
        cells = []
        for mode in modes:
            values = [r[key] * 1000 for r in rows[mode]]
            cells.append(f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})")
        print(f"{key:<18}" + "".join(f"{c:>20}" for c in cells))
    print()
    print_machine()


if __name__ == "__main__":
    asyncio.run(main())
