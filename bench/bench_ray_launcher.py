"""Request latency through a replica running as a Ray actor vs a local replica.

One gateway (in this process) serves four deployments of one replica each:
a no-op (``echo:Echo``) and a ~4 MB torch MLP (``mlp_apps:Mlps``, model
loaded once, then a forward pass per request), each once as a local
replica (Unix socket) and once as a Ray actor (``launcher: {kind: ray}``,
TCP on loopback with the cluster secret) on a one-node
``ray.cluster_utils.Cluster`` started here (loopback only). Requests go
one at a time over HTTP through the gateway; the four cells alternate in
rounds so that drift on a shared machine hits them alike. Prints p50, p99
and mean per cell and the ray/local ratios.

Run: ``flock /work/wt/bench.lock .venv/bin/python bench/bench_ray_launcher.py``
(needs ``muxgate[ray]``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray on loopback
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import httpx
from _common import percentile, print_machine

ROOT = Path(__file__).resolve().parents[1]
APPS = ROOT / "tests" / "apps"
MODEL = "serve_multiplexed_model_id"


def config(address: str, model_root: str) -> dict[str, Any]:
    ray = {"kind": "ray", "address": address, "namespace": "bench"}
    noop = {"import_path": "echo:Echo", "num_replicas": 1, "num_cpus": 0.5}
    mlp = {
        "import_path": "mlp_apps:Mlps",
        "init_kwargs": {"model_root": model_root},
        "num_replicas": 1,
        "num_cpus": 0.5,
    }
    return {
        "http": {"port": 0},
        "deployments": [
            {"name": "noop-local", "route_prefix": "/noop-local", **noop},
            {"name": "noop-ray", "route_prefix": "/noop-ray", "launcher": ray, **noop},
            {"name": "mlp-local", "route_prefix": "/mlp-local", **mlp},
            {"name": "mlp-ray", "route_prefix": "/mlp-ray", "launcher": ray, **mlp},
        ],
    }


async def run(args: argparse.Namespace, address: str) -> None:
    sys.path.insert(0, str(APPS))
    from mlp_apps import write_mlps

    from muxgate.gateway._config import parse_config
    from muxgate.gateway._serve import start_gateway

    with tempfile.TemporaryDirectory() as tmp:
        write_mlps(tmp, ["m1"])
        app = parse_config(config(address, tmp), base_dir=str(APPS))
        async with start_gateway(app) as gw:
            for pool in gw.pools.values():
                async with asyncio.timeout(120):
                    await pool.wait_for(lambda pool=pool: pool.running >= 1)  # type: ignore[misc]
            cells = ["noop-local", "noop-ray", "mlp-local", "mlp-ray"]
            lat: dict[str, list[float]] = {c: [] for c in cells}
            async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
                for cell in cells:  # warm: connection, model loaded
                    for _ in range(50):
                        r = await client.get(f"/{cell}", headers={MODEL: "m1"})
                        assert r.status_code == 200, r.text
                per_round = args.requests // args.rounds
                for _ in range(args.rounds):
                    for cell in cells:
                        for _ in range(per_round):
                            t0 = time.perf_counter()
                            r = await client.get(f"/{cell}", headers={MODEL: "m1"})
                            lat[cell].append(time.perf_counter() - t0)
                            assert r.status_code == 200, r.text
            ray_addresses = {c: next(iter(gw.pools[c].targets.values())).address for c in cells}
    print(f"replicas: {ray_addresses}")
    print(f"{'cell':<12} {'n':>6} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    stats: dict[str, tuple[float, float, float]] = {}
    for cell, values in lat.items():
        p50, p99, mean = (
            percentile(values, 0.5) * 1e3,
            percentile(values, 0.99) * 1e3,
            statistics.fmean(values) * 1e3,
        )
        stats[cell] = (p50, p99, mean)
        print(f"{cell:<12} {len(values):>6} {p50:>8.3f} {p99:>8.3f} {mean:>8.3f}")
    for kind in ("noop", "mlp"):
        local, ray = stats[f"{kind}-local"], stats[f"{kind}-ray"]
        print(
            f"{kind}: ray/local p50 {ray[0] / local[0]:.3f}, p99 {ray[1] / local[1]:.3f},"
            f" mean {ray[2] / local[2]:.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per cell")
    parser.add_argument("--rounds", type=int, default=10, help="rounds the cells alternate in")
    args = parser.parse_args()
    import ray
    from ray.cluster_utils import Cluster

    print_machine()
    print(f"ray {ray.__version__}")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "node_ip_address": "127.0.0.1", "include_dashboard": False},
    )
    try:
        asyncio.run(run(args, cluster.address))
    finally:
        # The bench's actors are detached: remove them with the cluster.
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
