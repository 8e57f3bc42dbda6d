"""Discrete-event simulation of model routing: hit rate, loads and latency.

Run: .venv/bin/python bench/bench_routing_sim.py [--requests N] [--rate R] [--quick]
     .venv/bin/python bench/bench_routing_sim.py --peer [--load-ms L --hit-ms H ...]

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

``--variants`` compares Router options at c=3/floor=4 (see ``VARIANTS``), e.g.
``--variants before,least_loaded_only,placement_only,default --seeds 8
--first-seed 1001``. Result that set ``holder_choice="least_loaded"`` and
``placement_choices=4`` (2 seed sets x 8 seeds x 9 cells, 2 shared cores):
least-loaded holders alone halve p50 in "hot" and "slow" (e.g. slow/zipf1.2
p50 76 -> 40 ms, p99 293 -> 113 ms) and cut loads by 2-4x there, with no
effect on "wide"; placement of models held nowhere alone lifts the "wide" hit
rate (zipf1.0 43 -> 57%, zipf1.2 62 -> 71%, shift 42 -> 50%) but costs p99 in
hot/slow; together they keep both gains (summary p99 gmean 1.13-1.27 vs
1.91-2.30 before, p50 gmean 1.02-1.05 vs 2.83-2.87, loads/1k 100-102 vs 115).
Tried and dropped, no clear win: placement for every miss, spills included
(copies scatter, slow/shift loads x2); placement only for models colder than
the home's victim; 2 or 8 candidates (2: less "wide" gain; 8: more loads under
shifting popularity); popularity half-lives 300 and 3000 requests (same as
1000); a known cache size instead of the learnt one (same; a per-replica
learnt size instead of the deployment-wide one: hot p99 x2-3); treating a
victim with another copy as free (noise); proactively copying a hot model
whose share of the in-flight load exceeds its copies' capacity
(``replicate``: never or rarely triggers beyond what the bound already does).

``--peer`` simulates ``bench/bench_peer.py``'s scenario instead, to check the
model against end-to-end measurements: a closed loop of ``-c`` clients
replaying the peer load generator's id sequence (same ``-n``, ``--dist``,
``-s``, ``--seed``), R replicas of K models, each replica one core that runs
its loads and its requests one after the other (``num_cpus: 1``), the
victim evicted once the new model is built, with the costs the peer
benchmark measures (a load, a hit, the gateway and client time per request);
routing as the gateway's defaults with the priced spill rule, with the
bounded-load rule, and with ``max_ongoing_requests`` 100 (no spills). Which
models share a replica depends on the replicas' ring positions, so it
averages over ``--rings`` replica id sets. The comparison with the measured
runs is in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import heapq
import itertools
import math
import os
import random
import sys
import time
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from _common import print_machine

from muxgate.gateway._router import RouteDecision, Router


class ReplicatingRouter(Router):
    """Experiment (b): give a hot model copies before its holders are full.

    A model whose decayed share of requests times the in-flight load exceeds
    what one replica takes under the bound (``share * (T + 1) > capacity``
    per copy) and whose least loaded holder is busy goes to the first
    non-holder under capacity in preference order (a stable order, as for a
    spill) instead of queueing behind the holder.
    """

    def choose(self, model_id: str) -> RouteDecision | None:
        d = super().choose(model_id)
        if d is None or not model_id or self.in_flight(d.replica_id) == 0:
            return d
        holders = self.holders(model_id)
        if not holders:
            return d  # a cold miss: placement decides
        cap = self.capacity()
        share = self.popularity.score(model_id) * math.log(2) / self.popularity.half_life
        if share * (self.total_in_flight + 1) <= cap * len(holders):
            return d
        for r in self.preference_list(model_id):
            if r not in holders and self.in_flight(r) < cap:
                return RouteDecision(r, r != d.home_replica_id, d.home_replica_id, "spill")
        return d


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
    # Closed loop (the peer benchmark's shape): this many clients, each sends
    # the next id of the sequence ``client_s`` after its previous answer; 0:
    # open loop (Poisson arrivals at ``rate``).
    clients: int = 0
    client_s: float = 0.0
    # A load occupies the replica's compute server (one CPU per replica, as
    # with ``num_cpus: 1``) instead of running beside the requests.
    load_on_cpu: bool = False
    warmup_fraction: float = 0.1
    ids: tuple[str, ...] = ()  # a fixed id sequence (closed loop); else from the workload
    # The victim goes once the new model is built (the replicas' default
    # load order), not when its load starts.
    evict_after: bool = False
    replica_prefix: str = "replica"
    # The priced rule's waited_s: since the request queued ("queued"), or
    # since a replica first had a slot it declined for the price ("refused").
    rent_from: str = "queued"  # replica ids (their ring positions): f"{prefix}-{i}"


@dataclass
class _Replica:
    cache: OrderedDict[str, None] = field(default_factory=OrderedDict)  # LRU first
    loading: dict[str, float] = field(default_factory=dict)  # model -> ready time
    pins: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0
    free_at: float = 0.0

    def evict_unpinned(self, limit: int, after: bool = False) -> None:
        while len(self.cache) + (0 if after else len(self.loading)) > limit:
            victim = next((m for m in self.cache if not self.pins.get(m)), None)
            if victim is None:
                return  # everything pinned: the excess goes once pins are released
            del self.cache[victim]


def workload(kind: str, p: Params) -> list[tuple[float, str]]:
    """Arrival times and model ids, identical for every policy (closed loop:
    only the ids count; the clients send them as answers come back)."""
    if p.ids:
        return [(0.0, model) for model in p.ids]
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
    weights = [1.0 / float(k**s) for k in range(1, p.models + 1)]
    return sum(weights[: p.replicas * p.cache_size]) / sum(weights)


def simulate(
    kind: str,
    policy: str,
    bf: float,
    floor: int,
    p: Params,
    options: tuple[tuple[str, object], ...] = (),
) -> dict[str, float]:
    arrivals = workload(kind, p)
    rng = random.Random(p.seed + 7)
    ids = [f"{p.replica_prefix}-{i}" for i in range(p.replicas)]
    if policy == "chash":
        # Consistent hashing without the load bound: only max_ongoing spills.
        router = Router(
            balance_factor=1e9,
            max_ongoing_requests=p.max_ongoing,
            rng=rng,
            holder_choice="first",
            placement_choices=1,
        )
    else:
        kwargs = dict(options)
        cls = ReplicatingRouter if kwargs.pop("replicate", False) else Router
        router = cls(
            balance_factor=bf if policy in ("bounded", "priced") else 1.25,
            min_capacity=floor,
            max_ongoing_requests=p.max_ongoing,
            rng=rng,
            spill_rule="priced" if policy == "priced" else "bounded_load",
            **kwargs,  # type: ignore[arg-type]
        )
        # The gateway learns both from the replicas; here they are known.
        router.load_s, router.service_s = p.load, p.service
    for r in ids:
        router.add_replica(r)
    reps = {r: _Replica() for r in ids}
    warmup = int(len(arrivals) * p.warmup_fraction)

    events: list[tuple[float, int, int, int, str]] = []  # (time, seq, kind, req, replica)
    seq = itertools.count()
    arrive_at: dict[int, float] = {}
    model_of: dict[int, str] = {}
    latencies: list[float] = []
    hits = loads = spills = queued_count = counted = 0
    queue: list[int] = []  # FIFO of request indexes
    queue_head = 0
    ARRIVE, READY, DONE = 0, 1, 2

    def pick(model: str, waiting: int = 1, waited_s: float = 0.0) -> tuple[str, bool] | None:
        if policy in ("bounded", "chash", "priced"):
            d = router.choose(model, waiting, waited_s)
            return None if d is None else (d.replica_id, d.spillover)
        if policy == "p2c":
            d = router.choose("")
            return None if d is None else (d.replica_id, False)
        free = [r for r in ids if reps[r].in_flight < p.max_ongoing]
        return (free[rng.randrange(len(free))], False) if free else None

    def queued_for(model: str) -> int:
        if policy != "priced":
            return 1  # only the priced rule reads it (and a long queue makes it slow)
        return sum(model_of[r] == model for r in queue[queue_head:])

    refused_at: dict[int, float] = {}  # request -> when it first declined a spill

    def waited(req: int, now: float) -> float:
        if p.rent_from == "refused":
            return now - refused_at.get(req, now)
        return now - arrive_at[req]

    def dispatch(req: int, now: float, queued: bool = False) -> bool:
        nonlocal hits, loads, spills
        model = model_of[req]
        choice = pick(model, queued_for(model) + (not queued), waited(req, now))
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
            if p.load_on_cpu:  # the load takes the replica's core
                start = max(now, rep.free_at)
                rep.free_at = ready = start + p.load
            else:
                ready = now + p.load
            rep.loading[model] = ready
            if not p.evict_after:
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
                d = router.choose(model, queued_for(model), waited(req, now))
                if d is None:
                    cap = router.capacity()
                    if policy == "priced" and any(router.in_flight(r) < cap for r in ids):
                        refused_at.setdefault(req, now)
                        continue  # this one waits for a holder; others may go
                    return
                if model in reps[d.replica_id].cache or model in reps[d.replica_id].loading:
                    dispatch(req, now, queued=True)
                    del queue[queue_head + j]
                    break
            else:
                head = queue[queue_head]
                if now - arrive_at[head] < p.load and router.total_in_flight > 0:
                    return
                if not dispatch(head, now, queued=True):
                    return
                queue_head += 1

    for i, (t, model) in enumerate(arrivals):
        if not p.clients or i < p.clients:
            heapq.heappush(events, (t, next(seq), ARRIVE, i, ""))
        arrive_at[i] = t
        model_of[i] = model
    next_request = p.clients  # closed loop: the next id a client sends

    finished_at = 0.0
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
                rep.evict_unpinned(p.cache_size, p.evict_after)
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
            rep.evict_unpinned(p.cache_size, p.evict_after)
            # As over the real connection: the reply carries the replica's state.
            router.observe(rid, models=list(rep.cache), loading=list(rep.loading))
            router.release(rid, model)
            if req >= warmup:
                latencies.append(now - arrive_at[req])
                counted += 1
                finished_at = now
            if p.clients and next_request < len(arrivals):
                arrive_at[next_request] = now + p.client_s
                heapq.heappush(events, (now + p.client_s, next(seq), ARRIVE, next_request, ""))
                next_request += 1
            if p.queue == "fifo":
                while queue_head < len(queue) and dispatch(queue[queue_head], now, queued=True):
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
        "loads": float(loads),
        "rps": n / max(1e-9, finished_at - arrive_at.get(warmup, 0.0)),
    }


_Job = tuple[str, str, float, int, Params, tuple[tuple[str, object], ...]]


def _job(args: _Job) -> dict[str, float]:
    kind, policy, bf, floor, p, options = args
    return simulate(kind, policy, bf, floor, p, options)


# Router options compared with --variants (all at c=3, floor=4). "limit" in a
# variant's options means "the replicas' real cache size" (the simulated K).
VARIANTS: dict[str, dict[str, object]] = {
    # The rule before placement and least-loaded holders (the bounded-load rule as first built).
    "before": {"holder_choice": "first", "placement_choices": 1},
    "least_loaded_only": {"placement_choices": 1},
    "placement_only": {"holder_choice": "first"},
    "default": {},
    "default+limit": {"cache_limit": "limit"},
    "place2": {"placement_choices": 2},
    "place8": {"placement_choices": 8},
    "half_life300": {"popularity_half_life": 300.0},
    "half_life3000": {"popularity_half_life": 3000.0},
    "replicate": {"replicate": True},
}


# (name, overrides): the regimes the defaults must do well in.
SCENARIOS: dict[str, dict[str, float]] = {
    # The hottest model needs more than one replica's compute (Zipf 1.2: ~38% of 400/s).
    "hot": {"models": 20, "rate": 400.0, "service": 0.010},
    # Slow requests: waiting behind 8 of them (320 ms) is close to a model load.
    "slow": {"models": 20, "rate": 100.0, "service": 0.040},
    # Cache pressure: 100 models for 8 x 4 slots, light traffic.
    "wide": {"models": 100, "rate": 80.0, "service": 0.010},
}


# The peer benchmark's routing configurations (closed loop, R=2, K=4): the
# gateway's defaults at max_ongoing_requests 5 (c=3, floor 2), with the priced
# spill rule and with the bounded-load rule, and max_ongoing_requests 100
# (holders never full: no spills).
PEER_POLICIES: dict[str, tuple[str, int, int]] = {
    "priced (default)": ("priced", 5, 2),
    "bounded_load": ("bounded", 5, 2),
    "no spills (max_ongoing 100)": ("bounded", 100, 50),
}


def peer_main(args: argparse.Namespace) -> None:
    """The peer benchmark's main scenario, closed loop, on its id sequence,
    with its measured costs; prints hit rate (1 - loads / requests, as the
    benchmark counts), loads and throughput per routing configuration."""
    from bench_peer import PEER

    sys.path.insert(0, str(PEER))
    from loadgen import make_id_sequence  # type: ignore[import-not-found]

    ids = tuple(
        str(i) for i in make_id_sequence(args.n, args.requests, args.dist, args.zipf_s, args.seed)
    )
    base = Params(
        replicas=args.replicas,
        cache_size=args.k,
        models=args.n,
        service=args.hit_ms / 1e3,
        load=args.load_ms / 1e3,
        requests=len(ids),
        clients=args.concurrency,
        client_s=args.client_ms / 1e3,
        load_on_cpu=True,
        evict_after=not args.evict_first,
        rent_from=args.rent_from,
        warmup_fraction=0.0,
        ids=ids,
    )
    print_machine()
    print(
        f"peer scenario: N={args.n} {args.dist} s={args.zipf_s} R={args.replicas} K={args.k} "
        f"c={args.concurrency} requests={len(ids)} seed={args.seed}; load {args.load_ms:g} ms "
        f"and hit {args.hit_ms:g} ms on the replica's core, {args.client_ms:g} ms outside it"
    )
    # Which models share a replica depends on where the replicas' ids fall on
    # the ring (the real ids are random): mean, min and max over rings.
    rings = [f"ring{i}" for i in range(args.rings)]
    print(f"  over {len(rings)} rings (replica id sets): mean [min, max]")
    print(f"  {'routing':<28} {'hit':>20} {'loads':>16} {'req/s':>6} {'p50 ms':>7} {'p99 ms':>7}")
    for name, (policy, max_ongoing, floor) in PEER_POLICIES.items():
        runs = [
            simulate(
                "peer",
                policy,
                3.0,
                floor,
                dataclasses.replace(base, max_ongoing=max_ongoing, replica_prefix=ring),
            )
            for ring in rings
        ]
        hits = [1.0 - r["loads"] / len(ids) for r in runs]
        loads = [r["loads"] for r in runs]

        def avg(key: str, runs: list[dict[str, float]] = runs) -> float:
            return sum(r[key] for r in runs) / len(runs)

        print(
            f"  {name:<28} {sum(hits) / len(hits):.3f} [{min(hits):.3f}, {max(hits):.3f}] "
            f"{sum(loads) / len(loads):>4.0f} [{min(loads):.0f}, {max(loads):.0f}] "
            f"{avg('rps'):>6.0f} {avg('p50_ms'):>7.1f} {avg('p99_ms'):>7.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=Params.requests)
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS))
    parser.add_argument("--queue", choices=["affinity", "fifo"], default=Params.queue)
    parser.add_argument("--seeds", type=int, default=2, help="independent runs per cell")
    parser.add_argument("--balance-factors", help="comma-separated, e.g. 1.25,2,3")
    parser.add_argument("--floors", help="comma-separated capacity floors, e.g. 1,2,4")
    parser.add_argument("--quick", action="store_true", help="fewer configurations")
    parser.add_argument(
        "--variants",
        help="comma-separated router variants (c=3, floor=4) instead of the grid: "
        + ",".join(VARIANTS),
    )
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--workloads", help="comma-separated subset of zipf1.0,zipf1.2,shift")
    peer = parser.add_argument_group("--peer: the peer benchmark's scenario, closed loop")
    peer.add_argument("--peer", action="store_true", help="simulate bench_peer.py's scenario")
    peer.add_argument("-n", type=int, default=20, help="models")
    peer.add_argument("--dist", choices=["zipf", "uniform"], default="zipf")
    peer.add_argument("-s", "--zipf-s", type=float, default=1.1)
    peer.add_argument("-k", type=int, default=4, help="models per replica")
    peer.add_argument("-r", "--replicas", type=int, default=2)
    peer.add_argument("-c", "--concurrency", type=int, default=8)
    peer.add_argument("--seed", type=int, default=42)
    peer.add_argument("--evict-first", action="store_true", help="evict when a load starts")
    peer.add_argument("--rent-from", choices=["queued", "refused"], default="queued")
    peer.add_argument("--rings", type=int, default=16, help="replica id sets to average over")
    peer.add_argument("--load-ms", type=float, default=7.35, help="a model load's CPU")
    peer.add_argument("--hit-ms", type=float, default=0.76, help="a hit's CPU in the replica")
    peer.add_argument("--client-ms", type=float, default=0.85, help="gateway + client per request")
    args = parser.parse_args()
    if args.peer:
        args.requests = 1500 if args.requests == Params.requests else args.requests
        peer_main(args)
        return
    scenarios = args.scenario or list(SCENARIOS)
    bfs = [1.25, 3.0] if args.quick else [1.1, 1.25, 1.5, 2.0, 3.0]
    floors = [1, 4] if args.quick else [1, 2, 4]
    if args.balance_factors:
        bfs = [float(x) for x in args.balance_factors.split(",")]
    if args.floors:
        floors = [int(x) for x in args.floors.split(",")]
    kinds = args.workloads.split(",") if args.workloads else ["zipf1.0", "zipf1.2", "shift"]
    base = Params(requests=args.requests, queue=args.queue)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
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
            if args.variants:
                for v in args.variants.split(","):
                    opts = tuple(VARIANTS[v].items())
                    if "cache_limit" in VARIANTS[v]:
                        opts = tuple(
                            (k, p.cache_size if k == "cache_limit" else x) for k, x in opts
                        )
                    jobs.append((kind, "bounded", 3.0, 4, p, opts))
                    keys.append((name, kind, seed, v))
                continue
            for bf in bfs:
                for fl in floors:
                    jobs.append((kind, "bounded", bf, fl, p, ()))
                    keys.append((name, kind, seed, f"bounded c={bf:g} floor={fl}"))
            for pol in ("chash", "p2c", "random"):
                jobs.append((kind, pol, 0.0, 1, p, ()))
                keys.append((name, kind, seed, pol))

    print_machine()
    print(
        f"common: R={base.replicas} replicas, K={base.cache_size} models/replica, "
        f"max_ongoing={base.max_ongoing}, load={base.load * 1e3:g} ms, "
        f"{base.requests:,} requests/run (first 10% warm-up), {len(seeds)} seeds per cell "
        f"(tables: mean over seeds), shift every {base.shift_every:g} s, "
        f"gateway queue {base.queue}"
    )
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = list(pool.map(_job, jobs))
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
