"""Models that hurt their replica: a poison id and a leak, with and without
the gateway's defences (quarantine, ``max_replica_rss_bytes``).

Uses ``tests/apps/hostile_apps.py`` ``Hostile`` (stand-in models; loading
``poison`` calls ``os._exit``, ``leak`` keeps N MiB per ``/leak`` request).

``--poison``: 3 replicas; 8 clients loop over 20 unrelated ids (each request
in flight 20 ms) while one client sends ``--poison-requests`` (30) requests
for ``poison`` spread over ``--seconds`` (10). Reports the poison requests'
statuses, the unrelated requests that failed, and replica deaths, with the
quarantine off (``quarantine: {enabled: false}``: the gateway before it
existed) and on (defaults).

``--leak``: 1 replica; 20 requests each leak 50 MiB, one request at a time,
each after the gateway saw the replica's memory (about one ping, 1 s).
Reports the replica's peak resident memory, replacements and failed
requests, without a limit and with ``max_replica_rss_bytes`` 512 MiB.

    flock /work/wt/bench.lock .venv/bin/python bench/bench_hostile.py

Results: docs/benchmarks.md ("Hostile models").
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import sys
from typing import Any

import httpx
from _common import print_machine

HERE = os.path.dirname(os.path.abspath(__file__))
APPS = os.path.join(HERE, "..", "tests", "apps")

from muxgate.gateway._config import parse_config  # noqa: E402
from muxgate.gateway._serve import start_gateway  # noqa: E402

MODEL = "serve_multiplexed_model_id"
MIB = 1 << 20


async def poll(check: Any, within_s: float = 30.0) -> None:
    """Until ``check()`` holds, at most ``within_s`` (state no event announces)."""
    for _ in range(int(within_s / 0.05)):
        if check():
            return
        await asyncio.sleep(0.05)


def config(replicas: int, **fields: Any) -> Any:
    deployment = {
        "name": "H",
        "import_path": "hostile_apps:Hostile",
        "num_replicas": replicas,
        **fields,
    }
    return parse_config({"http": {"port": 0}, "deployments": [deployment]}, base_dir=APPS)


async def poison_run(args: argparse.Namespace, quarantine: bool) -> dict[str, Any]:
    fields = {} if quarantine else {"quarantine": {"enabled": False}}
    async with (
        start_gateway(config(3, **fields)) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=60) as client,
    ):
        pool = gw.pools["H"]
        stop = asyncio.Event()
        unrelated: collections.Counter[int] = collections.Counter()
        poison: collections.Counter[str] = collections.Counter()
        started = set()

        async def worker(n: int) -> None:
            i = n
            while not stop.is_set():
                model = f"m{i % 20}"
                i += 8
                r = await client.get("/slow", params={"s": "0.02"}, headers={MODEL: model})
                unrelated[r.status_code] += 1
                if r.status_code == 200:
                    started.add(r.json()["pid"])

        workers = [asyncio.ensure_future(worker(n)) for n in range(8)]
        await asyncio.sleep(1.0)  # warm: every unrelated id loaded once
        for _ in range(args.poison_requests):
            r = await client.get("/", headers={MODEL: "poison"})
            code = r.json()["error"]["code"] if r.status_code != 200 else "ok"
            poison[f"{r.status_code} {code}"] += 1
            await asyncio.sleep(args.seconds / args.poison_requests)
        stop.set()
        await asyncio.gather(*workers)
        return {
            "quarantine": quarantine,
            "poison": dict(poison),
            "unrelated_failed": sum(v for k, v in unrelated.items() if k != 200),
            "unrelated_total": sum(unrelated.values()),
            "replica_processes": len(started),
            "running_after": pool.running,
        }


async def leak_run(args: argparse.Namespace, limit: int | None) -> dict[str, Any]:
    fields = {"max_replica_rss_bytes": limit} if limit else {}
    async with (
        start_gateway(config(1, **fields)) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=60) as client,
    ):
        pool = gw.pools["H"]

        def rss() -> list[int]:
            return [r["rss_bytes"] or 0 for r in pool.snapshot()["replicas"]]

        await poll(lambda: any(rss()))
        first = max(rss())
        peak, failed, replicas = first, 0, set()
        for _ in range(args.leak_requests):
            r = await client.get("/leak", params={"mb": str(args.leak_mb)}, headers={MODEL: "leak"})
            if r.status_code != 200:
                failed += 1
                continue
            replicas.add(r.json()["replica"])
            # Until the gateway saw it (its next ping), or the replica changed.
            want, replica = first + r.json()["leaked_mb"] * MIB, r.json()["replica"]
            await poll(
                lambda w=want, rep=replica: any(v >= w for v in rss()) or rep not in pool.targets
            )
            peak = max(peak, *rss())
        return {
            "limit_mib": limit // MIB if limit else None,
            "rss_first_mib": first // MIB,
            "rss_peak_mib": peak // MIB,
            "replicas_used": len(replicas),
            "failed": failed,
        }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--poison", action="store_true", help="only the poison id runs")
    parser.add_argument("--leak", action="store_true", help="only the leak runs")
    parser.add_argument("--poison-requests", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--leak-requests", type=int, default=20)
    parser.add_argument("--leak-mb", type=int, default=50)
    args = parser.parse_args()
    both = not (args.poison or args.leak)
    print_machine()
    if args.poison or both:
        for quarantine in (False, True):
            print(await poison_run(args, quarantine), flush=True)
    if args.leak or both:
        for limit in (None, 512 * MIB):
            print(await leak_run(args, limit), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, APPS)
    asyncio.run(main())
