"""Several gateways, one pool: two gateways over three standalone replicas
against one gateway carrying the same traffic.

Three ``muxgate replica`` processes on loopback TCP (the cluster secret
required) serve ``tests/apps/mlp_apps.py`` ``Mlps`` (real ~4 MB torch MLPs,
two per replica, ``max_ongoing_requests`` 5). Gateways are ``muxgate serve``
processes with a ``static`` launcher naming the three replicas. A closed
loop of ``--clients`` clients sends ``--requests`` requests each, model ids
drawn from Zipf(``--zipf-s``) over ``--models`` ids; client *i* draws from
its own seeded generator, so both setups see the same id sequences:

* ``one``: every client talks to one gateway;
* ``two``: client *i* talks to gateway *i* mod 2 (an even split).

Each setup starts fresh replicas (empty caches) and fresh gateways; with
``--runs N`` the setups alternate (one, two, one, two...), so host noise
hits both alike. Measured per run, from the replicas themselves (a
connection of the benchmark's own pings them; it sends no calls):

* hit rate: calls that found their model loaded (the replicas'
  ``cache_hits`` over hits plus misses);
* loads per request: models the replicas loaded, over requests answered;
* second copies: loads of a model that another replica held at the time
  (from the replicas' model events): deliberate copies of hot models (the
  gateways' spills, also counted, from their ``/-/metrics``) and the loads
  of gateways that disagree on where a model lives;
* the most calls a replica had in flight at once (sampled every 10 ms from
  its reports, all gateways' calls together) against its
  ``max_ongoing_requests``, and the fraction of samples where some replica
  was past it (those calls wait in the replica's own queue);
* answers by status and error code, ``overloaded`` counted apart (with at
  most ``3 x max_ongoing_requests`` clients some replica always has room, so
  any ``overloaded`` answer is one too many);
* throughput and latency percentiles; the host's busy fraction over the 2 s
  before each run (other jobs share the cores).

Targets (two gateways against one): hit rate at least one's minus 0.02,
loads per request at most one's plus 10%, no ``overloaded`` answer.

    flock /work/wt/bench.lock .venv/bin/python bench/bench_two_gateways.py --runs 2

Results: docs/benchmarks.md ("Two gateways, one pool").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import yaml
from _common import percentile, print_machine

REPO = Path(__file__).resolve().parents[1]
APPS = REPO / "tests" / "apps"
sys.path.insert(0, str(APPS))

from mlp_apps import write_mlps  # noqa: E402

from muxgate.gateway._connection import ReplicaConnection  # noqa: E402
from muxgate.replicas._channel import ChannelAuth  # noqa: E402

MODEL = "serve_multiplexed_model_id"
MUXGATE = [sys.executable, "-m", "muxgate.gateway._cli"]
SECRET = "bench-two-gateways-secret-0123456789"
DEPLOYMENT = "Mlps"
MAX_ONGOING = 5  # Mlps's @deployment(max_ongoing_requests=5)
REPLICAS = 3


def host_busy(seconds: float = 2.0) -> float:
    """Busy fraction of all cores over ``seconds`` (from /proc/stat)."""

    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields) - idle, sum(fields)

    busy0, total0 = sample()
    time.sleep(seconds)  # the measured window
    busy1, total1 = sample()
    return (busy1 - busy0) / max(1, total1 - total0)


def _find(path: Path, needle: str) -> str | None:
    for line in path.read_text(errors="replace").splitlines():
        if needle in line:
            return line.strip()
    return None


async def _line_from(path: Path, needle: str, proc: asyncio.subprocess.Process) -> str:
    """The first line of ``path`` containing ``needle`` (within 120 s)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = _find(path, needle)
        if line is not None:
            return line
        if proc.returncode is not None:
            break
        await asyncio.sleep(0.05)  # polling a log file, bounded by the deadline
    raise RuntimeError(f"no {needle!r} in {path} (see the file)")


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()


@contextlib.asynccontextmanager
async def processes(
    work: Path, root: str, gateways: int
) -> AsyncIterator[tuple[list[str], list[str]]]:
    """Start ``REPLICAS`` replicas, then ``gateways`` gateways over them;
    yield (replica addresses, gateway URLs); stop everything after."""
    env = {**os.environ, "MUXGATE_CLUSTER_SECRET": SECRET}
    deployment: dict[str, Any] = {
        "name": DEPLOYMENT,
        "import_path": "mlp_apps:Mlps",
        "init_kwargs": {"model_root": root},
        "num_replicas": REPLICAS,
    }
    config = {"app_dir": str(APPS), "deployments": [deployment]}
    replica_config = work / "replica.yaml"
    replica_config.write_text(yaml.safe_dump(config))
    started: list[asyncio.subprocess.Process] = []
    try:
        outs = []
        for i in range(REPLICAS):  # all at once, then each one's READY line
            out = work / f"replica-{i}.out"
            with out.open("wb") as stdout:
                proc = await asyncio.create_subprocess_exec(
                    *MUXGATE, "replica", str(replica_config), "--deployment", DEPLOYMENT,
                    "--listen", "tcp:127.0.0.1:0", "--name", f"mlps-{i}",
                    "--log-level", "WARNING",
                    env=env, stdout=stdout, stderr=subprocess.DEVNULL,
                )  # fmt: skip
            started.append(proc)
            outs.append((out, proc))
        lines = await asyncio.gather(*(_line_from(out, "READY ", proc) for out, proc in outs))
        addresses = [line.split(" ", 1)[1] for line in lines]
        deployment["launcher"] = {"kind": "static", "addresses": addresses}
        gateway_config = work / "gateway.yaml"
        gateway_config.write_text(yaml.safe_dump(config))
        logs = []
        for i in range(gateways):
            log = work / f"gateway-{i}.log"
            with log.open("wb") as stderr:
                proc = await asyncio.create_subprocess_exec(
                    *MUXGATE, "serve", str(gateway_config), "--port", "0",
                    "--log-level", "WARNING",
                    env=env, stdout=subprocess.DEVNULL, stderr=stderr,
                )  # fmt: skip
            started.append(proc)
            logs.append((log, proc))
        lines = await asyncio.gather(*(_line_from(log, "serving on", proc) for log, proc in logs))
        yield addresses, [line.rsplit(" ", 1)[-1] for line in lines]
    finally:
        for proc in reversed(started):  # gateways first
            await _stop(proc)


class ReplicaWatch:
    """The benchmark's own connections to the replicas: the most calls each
    had in flight (sampled), and their counters."""

    def __init__(self, conns: list[ReplicaConnection]) -> None:
        self.conns = conns
        self.peak: dict[str, int] = {c.replica_id: 0 for c in conns}
        self.samples = 0
        self.over = 0  # samples with some replica past max_ongoing_requests
        self.events: list[tuple[float, int, str, str, str]] = []  # time, seq, replica, kind, model
        self.seq: dict[str, int] = {c.replica_id: 0 for c in conns}
        self.stop = asyncio.Event()

    async def _ping_all(self) -> list[Any]:
        pongs = await asyncio.gather(
            *(c.ping(events_after=self.seq[c.replica_id]) for c in self.conns)
        )
        for conn, pong in zip(self.conns, pongs, strict=True):
            rid = conn.replica_id
            for e in pong.events:
                self.events.append((e.time, e.seq, rid, e.kind, e.model))
                self.seq[rid] = max(self.seq[rid], e.seq)
        return pongs

    async def sample(self, every_s: float = 0.01) -> None:
        await self._ping_all()  # skip the events before the run
        self.events.clear()
        while not self.stop.is_set():
            pongs = await self._ping_all()
            self.samples += 1
            self.over += any(p.state.in_flight > MAX_ONGOING for p in pongs)
            for conn, pong in zip(self.conns, pongs, strict=True):
                peak = self.peak[conn.replica_id]
                self.peak[conn.replica_id] = max(peak, pong.state.in_flight)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), every_s)
        await self._ping_all()

    def second_copies(self) -> int:
        """Loads of a model that another replica held (loaded) at the time:
        deliberate copies of hot models, and loads of gateways that disagree."""
        held: dict[str, set[str]] = {}
        copies = 0
        for _, _, rid, kind, model in sorted(self.events):
            where = held.setdefault(model, set())
            if kind == "load":
                copies += bool(where - {rid})
                where.add(rid)
            elif kind == "unload":
                where.discard(rid)
        return copies

    async def counters(self) -> dict[str, float]:
        total: Counter[str] = Counter()
        for pong in await asyncio.gather(*(c.ping() for c in self.conns)):
            total.update(pong.counters)
        return dict(total)


def sum_metric(text: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith((f"{name}{{", f"{name} "))
    )


class Clients:
    """The closed loop: client ``i`` draws its ids from ``Random(seed + i)``."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.models = [f"m{i:02d}" for i in range(args.models)]
        weights = [1 / (i + 1) ** args.zipf_s for i in range(args.models)]
        self.cum = list(itertools.accumulate(weights))
        self.args = args
        self.latencies: list[float] = []
        self.outcomes: Counter[str] = Counter()

    async def client(self, i: int, url: str) -> None:
        rng = random.Random(self.args.seed + i)
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            for _ in range(self.args.requests):
                model = rng.choices(self.models, cum_weights=self.cum)[0]
                started = time.perf_counter()
                response = await http.post("/", headers={MODEL: model})
                self.latencies.append(time.perf_counter() - started)
                if response.status_code == 200:
                    self.outcomes["200"] += 1
                else:
                    code = response.json().get("error", {}).get("code", "?")
                    self.outcomes[f"{response.status_code} {code}"] += 1


async def run(setup: str, args: argparse.Namespace, root: str) -> dict[str, Any]:
    gateways = 1 if setup == "one" else 2
    auth = ChannelAuth(SECRET.encode())
    with tempfile.TemporaryDirectory(prefix="bench-two-gw-") as work:
        async with processes(Path(work), root, gateways) as (addresses, urls):
            conns = [await ReplicaConnection.connect(a, auth=auth) for a in addresses]
            try:
                watch = ReplicaWatch(conns)
                before = await watch.counters()
                busy = await asyncio.to_thread(host_busy)
                clients = Clients(args)
                sampler = asyncio.create_task(watch.sample())
                started = time.perf_counter()
                await asyncio.gather(
                    *(clients.client(i, urls[i % gateways]) for i in range(args.clients))
                )
                elapsed = time.perf_counter() - started
                watch.stop.set()
                await sampler
                after = await watch.counters()
                spills = 0
                async with httpx.AsyncClient(timeout=30) as http:
                    for url in urls:
                        text = (await http.get(f"{url}/-/metrics")).text
                        spills += int(sum_metric(text, "muxgate_spillovers_total"))
            finally:
                for conn in conns:
                    await conn.aclose()
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    hits, misses = delta.get("cache_hits", 0.0), delta.get("cache_misses", 0.0)
    ok = clients.outcomes["200"]
    lat = clients.latencies
    return {
        "setup": setup,
        "busy_before": round(busy, 2),
        "requests": len(lat),
        "ok": ok,
        "req_s": round(len(lat) / elapsed, 1),
        "p50_ms": round(1e3 * percentile(lat, 0.5), 1),
        "p99_ms": round(1e3 * percentile(lat, 0.99), 1),
        "hit_rate": round(hits / max(1.0, hits + misses), 4),
        "loads": int(delta.get("model_loads", 0.0)),
        "loads_per_req": round(delta.get("model_loads", 0.0) / max(1, ok), 4),
        "peak_in_flight": max(watch.peak.values()),
        "over_limit": round(watch.over / max(1, watch.samples), 3),
        "second_copies": watch.second_copies(),
        "spills": spills,
        "overloaded": sum(n for k, n in clients.outcomes.items() if k.endswith(" overloaded")),
        "errors": dict(clients.outcomes - Counter({"200": ok})),
    }


COLUMNS = [
    "setup", "busy_before", "requests", "req_s", "p50_ms", "p99_ms", "hit_rate",
    "loads", "loads_per_req", "second_copies", "spills", "peak_in_flight", "over_limit",
    "overloaded", "errors",
]  # fmt: skip


def print_table(rows: list[dict[str, Any]]) -> None:
    cells = [COLUMNS] + [[str(row[c]) for c in COLUMNS] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)))


def verdict(rows: list[dict[str, Any]]) -> list[str]:
    """The targets, on the medians of each setup's runs."""

    def median(setup: str, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["setup"] == setup)

    hit1, hit2 = median("one", "hit_rate"), median("two", "hit_rate")
    lpr1, lpr2 = median("one", "loads_per_req"), median("two", "loads_per_req")
    overloaded = sum(r["overloaded"] for r in rows)
    return [
        f"hit rate: two {hit2:.4f} vs one {hit1:.4f} (target >= {hit1 - 0.02:.4f}):"
        f" {'met' if hit2 >= hit1 - 0.02 else 'MISSED'}",
        f"loads per request: two {lpr2:.4f} vs one {lpr1:.4f} (target <= {lpr1 * 1.1:.4f}):"
        f" {'met' if lpr2 <= lpr1 * 1.1 else 'MISSED'}",
        f"overloaded answers: {overloaded} (target 0): {'met' if overloaded == 0 else 'MISSED'}",
        f"peak in flight at a replica: {max(r['peak_in_flight'] for r in rows)}"
        f" (max_ongoing_requests {MAX_ONGOING}; calls past it wait in the replica)",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=40)
    parser.add_argument("--zipf-s", type=float, default=1.1)
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--requests", type=int, default=250, help="per client")
    parser.add_argument("--runs", type=int, default=1, help="alternating (one, two) pairs")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--setups", default="one,two")
    args = parser.parse_args()
    print_machine()
    setups = args.setups.split(",")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-two-gw-models-") as root:
        write_mlps(root, [f"m{i:02d}" for i in range(args.models)])
        for _ in range(args.runs):
            for setup in setups:
                row = asyncio.run(run(setup, args, root))
                print(row, flush=True)
                rows.append(row)
    print()
    print_table(rows)
    if {"one", "two"} <= set(setups):
        print()
        print("\n".join(verdict(rows)))


if __name__ == "__main__":
    main()
