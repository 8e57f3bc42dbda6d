"""The closed-loop latency floor: the p99 an ideal scheduler reaches at a run's costs.

Run: .venv/bin/python bench/bench_tail_floor.py [--miss-rate M --load-ms L --hit-ms H
     --data-plane-ms D -c C --cores N] [--measured-p99 MS] [--ray-p99 MS]

The peer benchmark's main scenario (``bench/bench_peer.py``) is a closed
loop on a CPU-bound host: c clients, each sending its next request when
its last is answered, and two cores that run everything (load generator,
gateway, replicas). Throughput is then CPU per request; the tail is the
order in which the cores take the work. This script asks what p99 a few
idealised schedules reach at given costs, with no cost of their own: no
context switch, no wake-up latency, no lock, no interpreter lock.

A request has up to three steps: its data plane (``--data-plane-ms``:
load generator and gateway, on any core), its model's load
(``--load-ms``, a fraction ``--miss-rate`` of requests, drawn
independently) and its forward pass with the replica's framework
(``--hit-ms``), both in its replica. A hit's replica is drawn at random
(its model's holder); a load goes to the replica with the fewest requests
in it (a model held nowhere loads where the fewest loads run). A request
that joins a running load counts as a hit, which makes every figure a
floor. The schedules:

- ``fifo``: one queue; each core takes the oldest request and runs all
  of it. Any core serves any request: this ignores cache affinity, so no
  multiplexing system reaches it at the same miss rate.
- ``affinity``: the data plane on any core, oldest first; a replica runs
  its requests' steps one request at a time in arrival order
  (``num_cpus: 1``); a core nobody can use idles.
- ``shared``: processor sharing: every request in flight gets an equal
  share of the cores (a fair kernel scheduler, one priority, no affinity).
- ``threads``: muxgate's threads under a fair kernel scheduler: two data
  plane threads, and in each replica a loader thread (its oldest load)
  and a serving thread (its oldest forward pass) at ``--serving-weight``
  of the loader's CPU weight (0.1: ``nice`` 10, ``loads_first``; 1: one
  priority). Each thread runs one request at a time; the cores are shared
  by weight, at most one core per thread.

Scheduling is preemptive at each event, in simulated time, pure Python;
the first tenth of the requests is left out.

With ``--measured-p99`` the table adds the measured p99 over each floor;
with ``--ray-p99`` the issue's target (a quarter of it) over each floor.
Results, and the costs that go in, are in docs/benchmarks.md ("What the
closed-loop p99 target asks of a schedule").
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from dataclasses import dataclass
from typing import Any

from _common import percentile, print_machine

POLICIES = ("fifo", "affinity", "shared", "threads")
#: threads that run the data plane (the load generator's and the gateway's)
FRONT_THREADS = 2


@dataclass
class Costs:
    """CPU milliseconds of one request's steps, and the fraction that load."""

    miss_rate: float = 0.25
    load_ms: float = 6.0
    hit_ms: float = 0.3
    data_plane_ms: float = 1.1


@dataclass
class _Request:
    seq: int
    arrived: float
    loads: bool
    #: the steps still to run: ("front" | "load" | "forward", CPU ms), in order
    steps: list[list[Any]]
    replica: int = -1  # set when the data plane is done

    @property
    def step(self) -> str:
        return str(self.steps[0][0])


@dataclass
class Floor:
    """What one policy reached: requests per second and latency, ms."""

    policy: str
    rps: float
    mean_ms: float
    p50_ms: float
    p99_ms: float


def simulate(
    policy: str,
    costs: Costs,
    *,
    clients: int = 8,
    cores: int = 2,
    replicas: int = 2,
    requests: int = 50_000,
    seed: int = 1,
    serving_weight: float = 0.1,
) -> Floor:
    """Run ``requests`` requests of a closed loop of ``clients`` under ``policy``."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; one of {', '.join(POLICIES)}")
    rng = random.Random(seed)
    counter = 0

    def new(now: float) -> _Request:
        nonlocal counter
        counter += 1
        loads = rng.random() < costs.miss_rate
        steps: list[list[Any]] = [["front", costs.data_plane_ms]]
        if loads:
            steps.append(["load", costs.load_ms])
        steps.append(["forward", costs.hit_ms])
        return _Request(counter, now, loads, steps)

    now = 0.0
    in_flight = [new(now) for _ in range(clients)]
    latencies: list[float] = []
    warm = requests // 10
    warm_end = 0.0
    while len(latencies) < requests:
        shares = _shares(policy, in_flight, cores, serving_weight)
        step = min(r.steps[0][1] / rate for r, rate in shares)
        now += step
        for r, rate in shares:
            r.steps[0][1] -= step * rate
        for r, _rate in shares:
            if r.steps[0][1] > 1e-9:
                continue
            r.steps.pop(0)
            if r.steps and r.replica < 0:
                _enter_replica(r, in_flight, replicas, rng)
            if not r.steps:
                in_flight.remove(r)
                latencies.append(now - r.arrived)
                if len(latencies) == warm:
                    warm_end = now
                in_flight.append(new(now))
    counted = latencies[warm:]
    return Floor(
        policy,
        rps=len(counted) / (now - warm_end) * 1000,
        mean_ms=statistics.fmean(counted),
        p50_ms=percentile(counted, 0.50),
        p99_ms=percentile(counted, 0.99),
    )


def _enter_replica(
    r: _Request, in_flight: list[_Request], replicas: int, rng: random.Random
) -> None:
    if r.loads:
        busy = [sum(1 for o in in_flight if o.replica == i) for i in range(replicas)]
        fewest = min(busy)
        r.replica = rng.choice([i for i in range(replicas) if busy[i] == fewest])
    else:
        r.replica = rng.randrange(replicas)


def _shares(
    policy: str, in_flight: list[_Request], cores: int, serving_weight: float
) -> list[tuple[_Request, float]]:
    """Which requests run now, each at what fraction of a core."""
    if policy == "shared":
        rate = min(1.0, cores / len(in_flight))
        return [(r, rate) for r in in_flight]
    oldest_first = sorted(in_flight, key=lambda r: r.seq)
    if policy == "fifo":
        return [(r, 1.0) for r in oldest_first[:cores]]
    if policy == "affinity":
        # the data plane anywhere; a replica's work one request at a time
        runnable: list[_Request] = []
        replica_busy: set[int] = set()
        for r in oldest_first:
            if r.replica < 0:
                runnable.append(r)
            elif r.replica not in replica_busy:
                replica_busy.add(r.replica)
                runnable.append(r)
        return [(r, 1.0) for r in runnable[:cores]]
    # threads: each thread runs its oldest request; the cores are shared by weight
    threads: dict[tuple[str, int], tuple[_Request, float]] = {}
    front = 0
    for r in oldest_first:
        if r.step == "front":
            if front < FRONT_THREADS:
                threads["front", front] = (r, 1.0)
                front += 1
        elif (r.step, r.replica) not in threads:
            weight = serving_weight if r.step == "forward" else 1.0
            threads[r.step, r.replica] = (r, weight)
    return _water_fill(list(threads.values()), cores)


def _water_fill(weighted: list[tuple[_Request, float]], cores: int) -> list[tuple[_Request, float]]:
    """Share ``cores`` by weight, no thread above one core (a fair kernel scheduler)."""
    shares: dict[int, float] = {}
    left = float(cores)
    open_ = list(weighted)
    while open_:
        total = sum(w for _r, w in open_)
        capped = [(r, w) for r, w in open_ if left * w / total >= 1.0]
        if not capped:
            for r, w in open_:
                shares[id(r)] = left * w / total
            break
        for r, _w in capped:
            shares[id(r)] = 1.0
            left -= 1.0
        open_ = [(r, w) for r, w in open_ if id(r) not in shares]
        if left <= 1e-12:
            break
    return [(r, shares[id(r)]) for r, _w in weighted if shares.get(id(r), 0.0) > 0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Costs()
    parser.add_argument("--miss-rate", type=float, default=defaults.miss_rate, help="loads/request")
    parser.add_argument("--load-ms", type=float, default=defaults.load_ms, help="a load's CPU")
    parser.add_argument(
        "--hit-ms", type=float, default=defaults.hit_ms, help="a forward pass's CPU"
    )
    parser.add_argument(
        "--data-plane-ms",
        type=float,
        default=defaults.data_plane_ms,
        help="everything else, CPU per request",
    )
    parser.add_argument("-c", "--clients", type=int, default=8)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("-r", "--replicas", type=int, default=2)
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--seeds", type=int, default=3, help="runs per policy (median shown)")
    parser.add_argument(
        "--serving-weight", type=float, default=0.1, help="threads: serving / loader weight"
    )
    parser.add_argument("--measured-p99", type=float, default=None, help="a run's p99, ms")
    parser.add_argument("--ray-p99", type=float, default=None, help="Ray Serve's p99, ms")
    args = parser.parse_args(argv)
    if not 0 <= args.miss_rate <= 1:
        parser.error("--miss-rate is a fraction in [0, 1]")
    costs = Costs(args.miss_rate, args.load_ms, args.hit_ms, args.data_plane_ms)
    print_machine()
    print(
        f"closed loop: c={args.clients} cores={args.cores} replicas={args.replicas}; "
        f"miss rate {costs.miss_rate}, load {costs.load_ms} ms, hit {costs.hit_ms} ms, "
        f"data plane {costs.data_plane_ms} ms; serving weight {args.serving_weight}; "
        f"{args.requests} requests x {args.seeds} seeds"
    )
    header = ["policy", "req/s", "mean ms", "p50 ms", "p99 ms"]
    if args.measured_p99:
        header.append(f"measured p99 ({args.measured_p99} ms) / floor")
    if args.ray_p99:
        header.append(f"target ({args.ray_p99 / 4:.1f} ms) / floor")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for policy in POLICIES:
        runs = [
            simulate(
                policy,
                costs,
                clients=args.clients,
                cores=args.cores,
                replicas=args.replicas,
                requests=args.requests,
                seed=seed,
                serving_weight=args.serving_weight,
            )
            for seed in range(1, args.seeds + 1)
        ]
        p99 = statistics.median(f.p99_ms for f in runs)
        cells = [
            policy,
            f"{statistics.median(f.rps for f in runs):.0f}",
            f"{statistics.median(f.mean_ms for f in runs):.1f}",
            f"{statistics.median(f.p50_ms for f in runs):.1f}",
            f"{p99:.1f}",
        ]
        if args.measured_p99:
            cells.append(f"{args.measured_p99 / p99:.2f}")
        if args.ray_p99:
            cells.append(f"{args.ray_p99 / 4 / p99:.2f}")
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
