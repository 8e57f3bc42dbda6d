"""A sweep through 200 distinct models of mixed sizes under a byte budget.

One replica of ``tests/apps/warm_apps.py`` ``Sized`` (a real torch
``Linear(w, w)`` per model id, rebuilt from its state dict file) with
``max_bytes_per_replica`` (``--budget-mib``, 16). The models' widths cycle
through 128, 256, 512, 1024 and 1448 (64 KiB to 8 MiB); each is requested
once, in order. After every request a metrics scrape refreshes what the
replica reports, and the bench reads:

- ``model_bytes`` (the cache's own count of resident model bytes, as each
  model measured once built): the largest value seen, against the budget;
- the replica process's ``VmHWM`` (peak resident memory over its life) from
  ``/proc``, against its resident memory before the sweep plus the budget
  plus the largest model (the one being built beside a full cache).

    flock /work/wt/bench.lock .venv/bin/python bench/bench_byte_budget.py

Results: docs/benchmarks.md ("Byte budget").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time

import httpx
from _common import print_machine

HERE = os.path.dirname(os.path.abspath(__file__))
APPS = os.path.join(HERE, "..", "tests", "apps")
sys.path.insert(0, APPS)

from warm_apps import linear_bytes, write_sized  # noqa: E402

from muxgate.gateway._config import parse_config  # noqa: E402
from muxgate.gateway._serve import start_gateway  # noqa: E402

MODEL = "serve_multiplexed_model_id"
MIB = 1 << 20
WIDTHS = (128, 256, 512, 1024, 1448)


def proc_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


async def sweep(models: int, budget: int, root: str) -> None:
    widths = {f"s{i:03d}": WIDTHS[i % len(WIDTHS)] for i in range(models)}
    write_sized(root, widths)
    config = parse_config(
        {
            "http": {"port": 0},
            "deployments": [
                {
                    "name": "Sweep",
                    "import_path": "warm_apps:Sized",
                    "init_kwargs": {"model_root": root},
                    "num_replicas": 1,
                    "max_bytes_per_replica": budget,
                }
            ],
        },
        base_dir=APPS,
    )
    async with (
        start_gateway(config) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=60) as client,
    ):
        await gw.pools["Sweep"].wait_healthy()
        (rep,) = (await client.get("/-/replicas")).json()["deployments"]["Sweep"]["replicas"]
        pid = rep["pid"]
        await client.post("/", headers={MODEL: "s000"})  # torch warmed up
        rss_before = proc_kib(pid, "VmRSS") * 1024
        hwm_before = proc_kib(pid, "VmHWM") * 1024
        peak_model_bytes = 0
        started = time.perf_counter()
        for model_id in widths:
            r = await client.post("/", headers={MODEL: model_id})
            assert r.status_code == 200, r.text
            await client.get("/-/metrics")  # every replica reports now
            (rep,) = (await client.get("/-/replicas")).json()["deployments"]["Sweep"]["replicas"]
            peak_model_bytes = max(peak_model_bytes, rep["model_bytes"])
        elapsed = time.perf_counter() - started
        hwm = proc_kib(pid, "VmHWM") * 1024
        largest = max(linear_bytes(w) for w in WIDTHS)
    print(
        f"models: {models} distinct, {len(WIDTHS)} sizes {WIDTHS}, "
        f"{sum(linear_bytes(w) for w in widths.values()) / MIB:.1f} MiB in all; "
        f"largest {largest / MIB:.2f} MiB; budget {budget / MIB:.1f} MiB"
    )
    print(f"sweep: {elapsed:.1f} s ({models / elapsed:.1f} requests/s, each a load)")
    print(
        f"peak resident model bytes: {peak_model_bytes / MIB:.2f} MiB "
        f"(budget {budget / MIB:.1f} MiB): {'within' if peak_model_bytes <= budget else 'OVER'}"
    )
    bound = rss_before + budget + largest
    print(
        f"replica RSS before the sweep {rss_before / MIB:.1f} MiB (peak so far "
        f"{hwm_before / MIB:.1f}); peak during it {hwm / MIB:.1f} MiB; "
        f"before + budget + largest model = {bound / MIB:.1f} MiB; "
        f"excess {(hwm - bound) / MIB:+.1f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=200)
    parser.add_argument("--budget-mib", type=float, default=16.0)
    args = parser.parse_args()
    print_machine()
    with tempfile.TemporaryDirectory() as root:
        asyncio.run(sweep(args.models, int(args.budget_mib * MIB), root))


if __name__ == "__main__":
    main()
