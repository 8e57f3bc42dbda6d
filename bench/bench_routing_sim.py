"""Discrete-event simulation of model routing: hit rate, loads and latency.

Run: .venv/bin/python bench/bench_routing_sim.py [--requests N] [--rate R] [--quick]

Model of a deployment (all in simulated time, pure Python, no sleeps):

- R replicas, each with an LRU cache of K models (pinned while a request uses
  them, as in the SDK), at most ``max_ongoing_requests`` requests in flight, one
  compute server (FIFO, ``service`` seconds per request) and concurrent model
  loads of ``load`` seconds (single flight per model id).
- Poisson arrivals over M model ids with Zipf popularity (s=1.0, s=1.2), and a
  "shift" workload (Zipf 1.0 whose ranking is reshuffled every ``shift_every``
  seconds).
- The gateway routes each request with one policy and queues it (FIFO) when
  the router returns None; every reply carries the replica's model state
  (``Router.observe``), as the real protocol does.

Policies: the bounded-load rule of ``muxgate.gateway._router.Router`` at
several balance factors and capacity floors; plain consistent hashing (no
bound: spill only at max_ongoing_requests); power of two choices ignoring the
model; uniformly random. The "ideal" line is the traffic share of the R x K
most popular models (the best hit rate any router could get with a static
placement). The first 10% of requests are warm-up and not counted.
Bounded: about 80 s on 2 idle cores with the defaults (``--quick``: ~20 s).

Result that set the Router defaults (balance_factor=3, min_capacity =
max_ongoing_requests / 2), run on 2 cores, 2 seeds x 9 cells: c=3/floor=4 had
the best p99 relative to the best policy of each run (geometric mean 1.17,
worst 2.10), no bound ("chash") 1.43 / 6.93, every c <= 2 at 1.80 / 10 or worse;
c <= 2 also loads 20-80% more models per 1,000 requests. The reason: a
load costs ~50 service times, so the paper's tight bounds spill (and load)
long before waiting would cost as much. ``--queue fifo`` (strict FIFO gateway
queue) collapses the "hot" scenario after the cold start for every policy
(hit rate ~15%, every request queued): a freed slot is handed to whatever
request is at the head, which is a miss on that replica, so the loads keep
the replicas full. Dispatching queued requests to replicas that already hold
their model first (``affinity``, the default here) avoids it.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import heapq
import itertools
import math
import os
import platform
import random
import sys
import time
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from muxgate.gateway._router import Router


@dataclass(frozen=True)
class Params:
    replicas: int = 8
    cache_size: int = 4
    max_ongoing: int = 8
    models: int = 100
    rate: float = 250.0  # requests per second
    service: float = 0.010
    load: float = 0.500
    requests: int = 8_000
    shift_every: float = 15.0
    seed: int = 1
    queue: str = "affinity"  # gateway queue discipline: "affinity" or "fifo"


@dataclass
class _Replica:
    cache: OrderedDict[str, None] = field(default_factory=OrderedDict)  # LRU first
    loading: dict[str, float] = field(default_factory=dict)  # model -> ready time
    pins: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0
    free_at: float = 0.0

    def evict_unpinned(self, limit: int) -> None:
        while len(self.cache) + len(self.loading) > limit:
            victim = next((m for m in self.cache if not self.pins.get(m)), None)
            if victim is None:
                return  # everything pinned: the excess goes once pins are released
            del self.cache[victim]


def workload(kind: str, p: Params) -> list[tuple[float, str]]:
    """Arrival times and model ids, identical for every policy."""
    rng = random.Random(p.seed)
    s = {"zipf1.0": 1.0, "zipf1.2": 1.2, "shift": 1.0}[kind]
    cum = list(itertools.accumulate(1.0 / (k**s) for k in range(1, p.models + 1)))
    total = cum[-1]
    perm = [f"model-{i}" for i in range(p.models)]
    rng.shuffle(perm)
    out = []
    t = 0.0
    next_shift = p.shift_every
    for _ in range(p.requests):
        t += rng.expovariate(p.rate)
        if kind == "shift" and t >= next_shift:
            rng.shuffle(perm)
            next_shift += p.shift_every
        out.append((t, perm[bisect.bisect_left(cum, rng.random() * total)]))
    return out


def ideal_hit_rate(kind: str, p: Params) -> float:
    s = {"zipf1.0": 1.0, "zipf1.2": 1.2, "shift": 1.0}[kind]
    weights = [1.0 / (k**s) for k in range(1, p.models + 1)]
    return sum(weights[: p.replicas * p.cache_size]) / sum(weights)


def simulate(kind: str, policy: str, bf: float, floor: int, p: Params) -> dict[str, float]:
    arrivals = workload(kind, p)
    rng = random.Random(p.seed + 7)
    ids = [f"replica-{i}" for i in range(p.replicas)]
    if policy == "chash":
        # Consistent hashing without the load bound: only max_ongoing spills.
        router = Router(balance_factor=1e9, max_ongoing_requests=p.max_ongoing, rng=rng)
    else:
        router = Router(
            balance_factor=bf if policy == "bounded" else 1.25,
            min_capacity=floor,
            max_ongoing_requests=p.max_ongoing,
            rng=rng,
        )
    for r in ids:
        router.add_replica(r)
    reps = {r: _Replica() for r in ids}
    warmup = p.requests // 10

    events: list[tuple[float, int, int, int, str]] = []  # (time, seq, kind, req, replica)
    seq = itertools.count()
    arrive_at: dict[int, float] = {}
    model_of: dict[int, str] = {}
    latencies: list[float] = []
    hits = loads = spills = queued_count = counted = 0
    queue: list[int] = []  # FIFO of request indexes
    queue_head = 0
    ARRIVE, READY, DONE = 0, 1, 2

    def pick(model: str) -> tuple[str, bool] | None:
        if policy in ("bounded", "chash"):
            d = router.choose(model)
            return None if d is None else (d.replica_id, d.spillover)
        if policy == "p2c":
            d = router.choose("")
            return None if d is None else (d.replica_id, False)
        free = [r for r in ids if reps[r].in_flight < p.max_ongoing]
        return (free[rng.randrange(len(free))], False) if free else None

    def dispatch(req: int, now: float) -> bool:
        nonlocal hits, loads, spills
        model = model_of[req]
        choice = pick(model)
        if choice is None:
            return False
        rid, spilled = choice
        rep = reps[rid]
        router.acquire(rid, model)
        rep.in_flight += 1
        rep.pins[model] = rep.pins.get(model, 0) + 1
        count = req >= warmup
        if model in rep.cache:
            rep.cache.move_to_end(model)
            ready = now
            hits += count
        elif model in rep.loading:
            ready = rep.loading[model]
        else:
            ready = now + p.load
            rep.loading[model] = ready
            rep.evict_unpinned(p.cache_size)
            loads += count
        spills += count and spilled
        heapq.heappush(events, (ready, next(seq), READY, req, rid))
        return True

    def drain_affinity(now: float) -> None:
        # Gateway queue, FIFO per model id: first dispatch the oldest queued
        # request whose model a replica under capacity already holds; fall
        # back to the head only once it has waited a load time (or nothing is
        # in flight), so a free slot is not spent thrashing a cache.
        nonlocal queue_head
        while queue_head < len(queue):
            window = queue[queue_head : queue_head + 64]
            for j, req in enumerate(window):
                model = model_of[req]
                d = router.choose(model)
                if d is None:
                    return
                if model in reps[d.replica_id].cache or model in reps[d.replica_id].loading:
                    dispatch(req, now)
                    del queue[queue_head + j]
                    break
            else:
                head = queue[queue_head]
                if now - arrive_at[head] < p.load and router.total_in_flight > 0:
                    return
                if not dispatch(head, now):
                    return
                queue_head += 1

    for i, (t, model) in enumerate(arrivals):
        heapq.heappush(events, (t, next(seq), ARRIVE, i, ""))
        arrive_at[i] = t
        model_of[i] = model

    while events:
        now, _, kind_, req, rid = heapq.heappop(events)
        if kind_ == ARRIVE:
            if queue_head < len(queue) or not dispatch(req, now):
                queue.append(req)
                queued_count += req >= warmup
        elif kind_ == READY:
            rep = reps[rid]
            model = model_of[req]
            if rep.loading.get(model) == now:
                del rep.loading[model]
                rep.cache[model] = None
                rep.evict_unpinned(p.cache_size)
            start = max(now, rep.free_at)
            rep.free_at = start + p.service
            heapq.heappush(events, (rep.free_at, next(seq), DONE, req, rid))
        else:
            rep = reps[rid]
            model = model_of[req]
            rep.in_flight -= 1
            rep.pins[model] -= 1
            if model in rep.cache:
                rep.cache.move_to_end(model)
            rep.evict_unpinned(p.cache_size)
            router.release(rid)
            router.observe(rid, models=list(rep.cache), loading=list(rep.loading))
            if req >= warmup:
                latencies.append(now - arrive_at[req])
                counted += 1
            if p.queue == "fifo":
                while queue_head < len(queue) and dispatch(queue[queue_head], now):
                    queue_head += 1
            else:
                drain_affinity(now)

    latencies.sort()
    n = max(1, counted)
    return {
        "hit": 100.0 * hits / n,
        "loads_per_1k": 1000.0 * loads / n,
        "p50_ms": 1e3 * latencies[len(latencies) // 2],
        "p99_ms": 1e3 * latencies[int(len(latencies) * 0.99)],
        "spill": 100.0 * spills / n,
        "queued": 100.0 * queued_count / n,
    }


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


_Job = tuple[str, str, float, int, Params]


def _job(args: _Job) -> tuple[str, str, float, int, dict[str, float]]:
    kind, policy, bf, floor, p = args
    return kind, policy, bf, floor, simulate(kind, policy, bf, floor, p)


# (name, overrides): the regimes the defaults must do well in.
SCENARIOS: dict[str, dict[str, float]] = {
    # The hottest model needs more than one replica's compute (Zipf 1.2: ~38% of 400/s).
    "hot": {"models": 20, "rate": 400.0, "service": 0.010},
    # Slow requests: waiting behind 8 of them (320 ms) is close to a model load.
    "slow": {"models": 20, "rate": 100.0, "service": 0.040},
    # Cache pressure: 100 models for 8 x 4 slots, light traffic.
    "wide": {"models": 100, "rate": 80.0, "service": 0.010},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=Params.requests)
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS))
    parser.add_argument("--queue", choices=["affinity", "fifo"], default=Params.queue)
    parser.add_argument("--seeds", type=int, default=2, help="independent runs per cell")
    parser.add_argument("--balance-factors", help="comma-separated, e.g. 1.25,2,3")
    parser.add_argument("--floors", help="comma-separated capacity floors, e.g. 1,2,4")
    parser.add_argument("--quick", action="store_true", help="fewer configurations")
    args = parser.parse_args()
    scenarios = args.scenario or list(SCENARIOS)
    bfs = [1.25, 3.0] if args.quick else [1.1, 1.25, 1.5, 2.0, 3.0]
    floors = [1, 4] if args.quick else [1, 2, 4]
    if args.balance_factors:
        bfs = [float(x) for x in args.balance_factors.split(",")]
    if args.floors:
        floors = [int(x) for x in args.floors.split(",")]
    kinds = ["zipf1.0", "zipf1.2", "shift"]
    base = Params(requests=args.requests, queue=args.queue)
    seeds = range(1, args.seeds + 1)
    params = {
        (name, seed): dataclasses.replace(
            base,
            models=int(SCENARIOS[name]["models"]),
            rate=SCENARIOS[name]["rate"],
            service=SCENARIOS[name]["service"],
            seed=seed,
        )
        for name in scenarios
        for seed in seeds
    }
    jobs: list[_Job] = []
    keys: list[tuple[str, str, int, str]] = []  # (scenario, workload, seed, policy name)
    for (name, seed), p in params.items():
        for kind in kinds:
            for bf in bfs:
                for fl in floors:
                    jobs.append((kind, "bounded", bf, fl, p))
                    keys.append((name, kind, seed, f"bounded c={bf:g} floor={fl}"))
            for pol in ("chash", "p2c", "random"):
                jobs.append((kind, pol, 0.0, 1, p))
                keys.append((name, kind, seed, pol))

    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"machine: nproc={os.cpu_count()} cpu={cpu_model()!r} python={platform.python_version()}")
    print(
        f"common: R={base.replicas} replicas, K={base.cache_size} models/replica, "
        f"max_ongoing={base.max_ongoing}, load={base.load * 1e3:g} ms, "
        f"{base.requests:,} requests/run (first 10% warm-up), {len(seeds)} seeds per cell "
        f"(tables: mean over seeds), shift every {base.shift_every:g} s, "
        f"gateway queue {base.queue}"
    )
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = [r for *_, r in pool.map(_job, jobs)]
    # cell (scenario, workload) -> policy -> per-seed results
    cells: dict[tuple[str, str], dict[str, list[dict[str, float]]]] = {}
    for (name, kind, _seed, policy), r in zip(keys, results, strict=True):
        cells.setdefault((name, kind), {}).setdefault(policy, []).append(r)
    metrics = ["hit", "loads_per_1k", "p50_ms", "p99_ms", "spill", "queued"]
    header = (
        f"  {'policy':<22} {'hit %':>6} {'loads/1k':>9} {'p50 ms':>7} {'p99 ms':>8} "
        f"{'spill %':>8} {'queued %':>9}"
    )
    for (name, kind), rows in cells.items():
        p = params[(name, seeds[0])]
        print()
        print(
            f"{name} / {kind}: M={p.models}, rate={p.rate:g}/s, service={p.service * 1e3:g} ms "
            f"(compute {p.rate * p.service / p.replicas:.0%}); "
            f"ideal hit rate (top R x K models) {ideal_hit_rate(kind, p):.1%}"
        )
        print(header)
        print("  " + "-" * (len(header) - 2))
        for policy, runs in rows.items():
            m = {k: sum(r[k] for r in runs) / len(runs) for k in metrics}
            print(
                f"  {policy:<22} {m['hit']:>6.1f} {m['loads_per_1k']:>9.1f} {m['p50_ms']:>7.1f} "
                f"{m['p99_ms']:>8.1f} {m['spill']:>8.1f} {m['queued']:>9.2f}"
            )
    # Summary: per (cell, seed), p99 relative to the best policy of that run;
    # geometric mean and worst over all of them, plus mean hit rate and loads.
    names = list(next(iter(cells.values())))
    ratio: dict[str, list[float]] = {n: [] for n in names}
    p50: dict[str, list[float]] = {n: [] for n in names}
    for rows in cells.values():
        for i in range(len(seeds)):
            best99 = min(runs[i]["p99_ms"] for runs in rows.values())
            best50 = min(runs[i]["p50_ms"] for runs in rows.values())
            for policy, runs in rows.items():
                ratio[policy].append(runs[i]["p99_ms"] / best99)
                p50[policy].append(runs[i]["p50_ms"] / best50)

    def gmean(xs: list[float]) -> float:
        return math.exp(sum(math.log(x) for x in xs) / len(xs))

    def mean(policy: str, key: str) -> float:
        runs = [r for rows in cells.values() for r in rows[policy]]
        return sum(r[key] for r in runs) / len(runs)

    print("\nsummary over all cells and seeds (latency / best latency of the same run)")
    print(
        f"  {'policy':<22} {'p99 gmean':>9} {'p99 worst':>9} {'p50 gmean':>9} "
        f"{'hit %':>6} {'loads/1k':>9} {'queued %':>9}"
    )
    for policy in sorted(names, key=lambda n: gmean(ratio[n])):
        print(
            f"  {policy:<22} {gmean(ratio[policy]):>9.2f} {max(ratio[policy]):>9.2f} "
            f"{gmean(p50[policy]):>9.2f} {mean(policy, 'hit'):>6.1f} "
            f"{mean(policy, 'loads_per_1k'):>9.1f} {mean(policy, 'queued'):>9.2f}"
        )
    print(f"\nwall time {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
